"""``graphwright.tune``: multi-objective search over recipe settings (Optuna), see ``study.tune``."""
