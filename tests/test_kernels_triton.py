"""The Triton dequantize-matmul kernel == dequantize-then-matmul, run on CPU by the Triton interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported and before the kernel's first launch

import pytest
import torch

pytest.importorskip("triton")

from dgemma.kernels import dequant_matmul, triton_dequant
from dgemma.quant.formats import QTensor, quantize

# Error allowed relative to the largest output. The interpreter turns float32 into bfloat16 by truncation, off by up
# to one step (2^-7 relative) where a GPU and PyTorch round to nearest; it does so for the weights and for y.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}

# (kind, group, N, K): N is never a multiple of the 64-wide block; K = 96 and 176 are not multiples of 64, and
# groups of 88 straddle two K blocks.
WEIGHTS = [("int8", None, 70, 96), ("int8", 32, 70, 96), ("int4", 32, 70, 96), ("int4", 64, 40, 192),
           ("int4", 128, 33, 384), ("int4", 88, 70, 176)]


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check(x, q):
    y, ref = triton_dequant.linear(x, q), dequant_matmul.linear_reference(x, q)
    assert y.shape == ref.shape and y.dtype == x.dtype
    scale = ref.float().abs().max()
    err = (y.float() - ref.float()).abs().max() / scale
    assert err <= TOLERANCE[x.dtype], f"max error {err:.2e} of the output scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind, group, n, k", WEIGHTS)
def test_matches_reference(kind, group, n, k, dtype):
    q = quantize(_randn(n, k, seed=n + k) * 0.02, kind, group)
    assert q.group_size == (group or k)
    for m in (1, 3, 37):
        _check(_randn(m, k, seed=m).to(dtype), q)


def test_int8_half_scales_and_strided_3d_input():
    q = quantize(_randn(70, 176, seed=1), "int8", 88)
    q = q.map(lambda t: t.half() if t.is_floating_point() else t)  # float16 scales, as formats allows
    x = _randn(2, 5, 200, seed=2)[..., :176]  # [B, T, K], rows 200 apart in memory
    assert not x.is_contiguous()
    _check(x, q)
    _check(x.bfloat16(), q)


def test_refuses_fp8_and_stacked_weights():
    w = _randn(2, 16, 64, seed=3)
    with pytest.raises(ValueError, match="2-D int8 or int4"):
        triton_dequant.linear(_randn(1, 64, seed=4), quantize(w, "int4", 32))
    with pytest.raises(ValueError, match="2-D int8 or int4"):
        triton_dequant.linear(_randn(1, 64, seed=4), QTensor("fp8", w[0].to(torch.float8_e4m3fn), torch.ones(16, 1)))
    assert triton_dequant.available(torch.zeros(1))  # the interpreter counts, CPU tensors and all
