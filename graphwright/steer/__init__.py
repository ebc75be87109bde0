"""PASTA / AutoPASTA attention steering beyond the graph rewrite itself.

The ``steer`` pass (``graphwright/passes/steer.py``) puts a key bias into chosen attention heads;
this package holds everything around it: the graph-side bias function (``bias``), turning
emphasized token spans into the graph's extra input (``emphasis``), mapping text spans to tokens
(``spans``), seeded synthetic tasks (``tasks``), head profiling (``profile``) and AutoPASTA
(``autopasta``).
"""

from .bias import STEER_INPUT, steer_key_bias  # noqa: F401
