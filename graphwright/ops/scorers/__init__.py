"""KV scorers: one module per scorer (paper id, rule, exact setting in its docstring); ``SCORERS`` by name.

Adding a scorer is one module and one entry in ``SCORERS`` (its ``Scorer`` object); the generic
eviction op and ``evict(score=...)`` pick it up by name. Stateful policies with their own op
(Keyformer, Scissorhands) join ``evict`` through ``passes/evict.py::DELEGATES`` instead.
"""

from __future__ import annotations

from .base import ScoreInputs, Scorer  # noqa: F401
from .criticalkv import CRITICALKV
from .cumulative import H2O
from .expected_attention import EXPECTED_ATTENTION
from .finch import FINCH
from .keydiff import KEYDIFF
from .knorm import KNORM
from .lagkv import LAGKV
from .qfilter import QFILTER
from .snapkv import SNAPKV
from .tova import TOVA

SCORERS: dict[str, Scorer] = {s.name: s for s in (SNAPKV, H2O, KNORM, TOVA, KEYDIFF, EXPECTED_ATTENTION,
                                                 CRITICALKV, LAGKV, QFILTER, FINCH)}
CHUNKKV = "chunkkv"  # SnapKV in chunks of 20 (``chunkkv.py``): a selection wrapper, not a scorer of its own
