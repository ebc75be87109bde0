"""Quality of a recipe against its base model: perplexity, needle-in-a-haystack, greedy agreement, plots.

Every function takes the base HF model and a CompiledModel alike and returns plain data
(dicts of numbers and strings) ready for JSON.
"""

from .agreement import agreement_prompts, compare_greedy
from .data import default_text_path, read_text
from .niah import compare_niah, needle_grid, run_niah
from .perplexity import compare_perplexity, perplexity
from .plot import plot_sweep

__all__ = ["default_text_path", "read_text", "perplexity", "compare_perplexity", "needle_grid", "run_niah",
           "compare_niah", "plot_sweep", "agreement_prompts", "compare_greedy"]
