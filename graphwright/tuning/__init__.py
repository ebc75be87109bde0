"""``graphwright.tuning`` (``graphwright.tune(...)`` at the top level): multi-objective search over recipe settings (Optuna NSGA-II).

``from graphwright.tuning import tune`` (``study.tune``); the search space is ``space.search_space``,
the trial's measurements ``objectives.Evaluator``, the outputs ``report.write_outputs``.
"""

from .space import Param, search_space
from .study import recover_lost, tune

__all__ = ["Param", "recover_lost", "search_space", "tune"]
