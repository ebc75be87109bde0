"""Speed and memory benchmarks of a CompiledModel against its base HF model (alternating runs, medians, ratios)."""

from .generate import bench_generate, format_bench

__all__ = ["bench_generate", "format_bench"]
