"""The compiled backend's Inductor settings for the CPU decode step (``compiled.DECODE_CONFIG``).

Invariant checked: with ``DECODE_CONFIG`` a batch-1 decode-sized elementwise kernel (SmolLM2's
SiLU * up product, 1,536 elements) is generated without an OpenMP parallel region and without
``assert_size_stride`` checks in the wrapper, where the session-13 settings (``PREVIOUS_CONFIG``)
parallelised it at 2 threads; both compute the eager result. Inductor compiles C++: ``slow``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphwright.codegen.torch.compiled import DECODE_CONFIG, PREVIOUS_CONFIG, compile_decode


class SiluUp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(1536, 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, up):
        return F.silu(F.linear(x, self.w)) * up


def test_decode_config_keeps_freezing_and_serialises_small_kernels():
    assert DECODE_CONFIG["freezing"] and PREVIOUS_CONFIG == {"freezing": True}
    assert 1536 // 2 < DECODE_CONFIG["cpp.min_chunk_size"]  # 2 threads: below the chunk, no parallel region


@pytest.mark.slow
@pytest.mark.parametrize("config, parallel", [(None, False), (PREVIOUS_CONFIG, True)], ids=["decode", "previous"])
def test_batch_one_elementwise_kernel_is_serial_with_the_decode_config(config, parallel):
    from torch._inductor.utils import run_and_get_code

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch._dynamo.reset()
        g = torch.Generator().manual_seed(1)
        x, up = torch.randn(1, 1, 64, generator=g), torch.randn(1, 1, 1536, generator=g)
        gm = torch.fx.symbolic_trace(SiluUp())
        with torch.no_grad():
            want = gm(x, up)
            got, codes = run_and_get_code(compile_decode(gm, config=config), x, up)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    code = "\n".join(codes)
    assert "silu" in code
    assert ("#pragma omp parallel" in code) == parallel
    assert ("assert_size_stride(" in code) == parallel  # calls (the header always imports the name)
