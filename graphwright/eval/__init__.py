"""Quality of a recipe against its base model: perplexity, needle-in-a-haystack, greedy agreement, plots,
and the long-context suite (``run_suite``: needles at scale, RULER-style tasks, streamed held-out perplexity).

Every function takes the base HF model and a CompiledModel alike and returns plain data
(dicts of numbers and strings) ready for JSON.
"""

from .agreement import agreement_prompts, compare_greedy
from .bytetok import ByteTokenizer
from .data import calibration_part, default_text_path, heldout_part, read_text
from .modes import default_ppl_mode
from .niah import compare_niah, needle_grid, needle_suite, run_niah
from .perplexity import compare_perplexity, heldout_windows, long_perplexity, perplexity
from .plot import plot_sweep
from .ruler import ruler_cases, run_ruler, string_match_all
from .suite import run_suite

__all__ = ["default_text_path", "read_text", "perplexity", "compare_perplexity", "needle_grid", "run_niah",
           "compare_niah", "plot_sweep", "agreement_prompts", "compare_greedy", "needle_suite", "ruler_cases", "run_ruler",
           "string_match_all", "heldout_windows", "long_perplexity", "run_suite", "default_ppl_mode", "calibration_part",
           "heldout_part", "ByteTokenizer"]
