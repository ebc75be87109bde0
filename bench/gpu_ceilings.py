"""The two ceilings of the GPU this runs on, measured (not the datasheet's): copy bandwidth and bf16 matmul rate.

Usage (needs a CUDA GPU): python bench/gpu_ceilings.py. Prints versions, a 1 GiB device-to-device copy
(bytes read + written over the median time of ``triton.testing.do_bench``) and an 8192^3 bf16 matmul on
random data; the GPU benchmarks' achieved GB/s and TFLOP/s are read against these.
"""

import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        sys.exit("gpu_ceilings: no CUDA GPU here")
    import transformers
    import triton
    from triton.testing import do_bench

    print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
          "gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    x = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median") * 1e-3
    print(f"copy: {2 * x.numel() * 2 / t / 1e12:.2f} TB/s (bytes read + written)")
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t = do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median") * 1e-3
    print(f"bf16 matmul 8192^3: {2 * 8192**3 / t / 1e12:.0f} TFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
