"""The Triton dequantize-matmul kernels == dequantize-then-matmul, run on CPU by the Triton interpreter."""

import os

# Before triton is imported (dgemma imports it only at a kernel's first launch). It holds for the rest of the pytest
# process; no test launches the compiled kernels on CUDA.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from dgemma.config import preset
from dgemma.kernels import dequant_matmul, triton_dequant, triton_norm
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model import layers
from dgemma.model.layers import apply_rope, rms_norm
from dgemma.quant.formats import QTensor, quantize
from dgemma.quant.modules import QuantExperts, quantize_model
from test_quant import int8_with_offsets

# Error allowed relative to the largest output. The interpreter turns float32 into bfloat16 by truncation, off by up
# to one step (2^-7 relative) where a GPU and PyTorch round to nearest; it does so for the weights and for y.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}

# (kind, group, N, K): N is never a multiple of the 64-wide block; K = 96 and 176 are not multiples of 64, groups of
# 88 straddle two K blocks, and int4 groups of 16 (GGUF's Q2_K / Q3_K) fill half of the 16 bytes a K-step reads;
# int8 groups of 16 are GGUF's Q6_K, IQ2_XS, IQ2_S and IQ1_M.
WEIGHTS = [("int8", None, 70, 96), ("int8", 32, 70, 96), ("int8", 16, 70, 96), ("int4", 32, 70, 96),
           ("int4", 64, 40, 192), ("int4", 128, 33, 384), ("int4", 88, 70, 176), ("int4", 16, 70, 96)]


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check(x, q):
    _close(triton_dequant.linear(x, q), dequant_matmul.linear_reference(x, q), x.dtype)


def _close(y, ref, dtype, products=1):
    """y == ref within TOLERANCE of ref's largest value per chain of `products` kernel products."""
    assert y.shape == ref.shape and y.dtype == dtype
    scale = ref.float().abs().max()
    err = (y.float() - ref.float()).abs().max() / scale
    assert err <= products * TOLERANCE[dtype], f"max error {err:.2e} of the output scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind, group, n, k", WEIGHTS)
def test_matches_reference(kind, group, n, k, dtype):
    q = quantize(_randn(n, k, seed=n + k) * 0.02, kind, group)
    assert q.group_size == (group or k)
    for m in (1, 3, 37):
        _check(_randn(m, k, seed=m).to(dtype), q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_float_weights_match_plain_products(dtype):
    """A weight in the input's dtype goes through the same tiles, undecoded: linear and grouped."""
    w = (_randn(3, 70, 96, seed=8) * 0.02).to(dtype)  # [E, N, K]
    for m in (1, 37):
        x = _randn(2, m, 96, seed=m).to(dtype)
        _close(triton_dequant.linear(x, w[0]), F.linear(x.float(), w[0].float()).to(dtype), dtype)
    counts = [17, 0, 5]
    xs = _randn(sum(counts), 96, seed=9).to(dtype)
    ref = torch.cat([F.linear(part.float(), w[e].float()) for e, part in enumerate(xs.split(counts))]).to(dtype)
    _close(triton_dequant.grouped_linear(xs, torch.tensor(counts), w), ref, dtype)
    with pytest.raises(ValueError, match="in the input's dtype"):
        triton_dequant.linear(_randn(1, 96, seed=1).to(dtype), w[0].double())


def test_int8_half_scales_and_strided_3d_input():
    q = quantize(_randn(70, 176, seed=1), "int8", 88)
    q = q.map(lambda t: t.half() if t.is_floating_point() else t)  # float16 scales, as formats allows
    x = _randn(2, 5, 200, seed=2)[..., :176]  # [B, T, K], rows 200 apart in memory
    assert not x.is_contiguous()
    _check(x, q)
    _check(x.bfloat16(), q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [None, 32, 16])
def test_int8_with_offsets_matches_reference(group, dtype):
    """int8 codes with an offset per group (GGUF's Q5_1 / Q5_K blocks): one weight, and stacked experts."""
    q = int8_with_offsets(_randn(3, 70, 96, seed=group or 0) * 0.02, group)  # [E, N, K]
    for m in (1, 37):
        _check(_randn(m, 96, seed=m).to(dtype), q.map(lambda t: t[0]))
    counts = COUNTS[0][:3]
    xs = _randn(sum(counts), 96, seed=5).to(dtype)
    _close(triton_dequant.grouped_linear(xs, torch.tensor(counts), q), _grouped_reference(xs, counts, q), dtype)


def test_refuses_fp8_and_stacked_weights():
    w = _randn(2, 16, 64, seed=3)
    with pytest.raises(ValueError, match="2-D int8 or int4"):
        triton_dequant.linear(_randn(1, 64, seed=4), quantize(w, "int4", 32))
    with pytest.raises(ValueError, match="2-D int8 or int4"):
        triton_dequant.linear(_randn(1, 64, seed=4), QTensor("fp8", w[0].to(torch.float8_e4m3fn), torch.ones(16, 1)))
    with pytest.raises(ValueError, match="3-D int8 or int4"):
        triton_dequant.grouped_linear(_randn(1, 64, seed=4), torch.ones(1), quantize(w[0], "int8"))
    assert triton_dequant.available(torch.zeros(1))  # the interpreter counts, CPU tensors and all


# Rows per expert: empty experts, one expert with every row, uneven counts (17 rows: two tiles of 16), counts that
# fill the launch's bound on m-tiles exactly (every non-empty count is 1 past a multiple of 16), and 64-row tiles.
COUNTS = [[0, 5, 1, 0, 17, 3], [0, 0, 37], [17, 1, 0, 1, 1], [70, 0]]


def _grouped_reference(xs, counts, q):
    """Expert by expert: rows [start, start + counts[e]) of xs times W[e]^T."""
    outs, start = [], 0
    for expert, count in enumerate(counts):
        outs.append(dequant_matmul.linear_reference(xs[start:start + count], q.map(lambda t, e=expert: t[e])))
        start += count
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("counts", COUNTS, ids=str)
@pytest.mark.parametrize("kind, group, n, k", [w for w in WEIGHTS if w[:2] in
                                              (("int8", None), ("int8", 32), ("int4", 32), ("int4", 88),
                                               ("int4", 16))])
def test_grouped_matches_per_expert_reference(kind, group, n, k, counts, dtype):
    q = quantize(_randn(len(counts), n, k, seed=n + k) * 0.02, kind, group)  # [E, N, K]
    xs = _randn(sum(counts), k, seed=len(counts)).to(dtype)  # [P, K]
    y = triton_dequant.grouped_linear(xs, torch.tensor(counts), q)
    _close(y, _grouped_reference(xs, counts, q), dtype)


def test_grouped_without_rows_and_with_wrong_counts():
    q = quantize(_randn(3, 70, 96, seed=5), "int8")
    assert triton_dequant.grouped_linear(_randn(0, 96, seed=6), torch.zeros(3, dtype=torch.long), q).shape == (0, 70)
    with pytest.raises(ValueError, match="3 experts"):
        triton_dequant.grouped_linear(_randn(4, 96, seed=6), torch.tensor([4, 0]), q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind, group", [("int8", None), ("int4", 32)])
def test_quant_experts_grouped_path_matches_per_expert_path(kind, group, dtype, monkeypatch, float32_products):
    net = quantize_model(DiffusionGemma(preset("tiny")).init_weights(0).to(dtype), kind, group)
    experts = net.layers[0].experts
    assert isinstance(experts, QuantExperts)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(11, net.config.hidden_size, generator=gen).to(dtype)  # [N, H]
    index = torch.tensor([1, 3, 6, 7])[torch.randint(0, 4, (11, 2), generator=gen)]  # [N, k]; experts 0, 2, 4, 5 idle
    weights = torch.rand(11, 2, generator=gen).to(dtype)  # [N, k]
    per_expert = experts(x, weights, index)  # CPU tensors: `_mlp` takes the per-expert path
    monkeypatch.setattr(experts, "_mlp", experts._grouped_mlp)
    _close(experts(x, weights, index), per_expert, dtype, products=2)  # gate_up's output feeds down


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float_experts_through_triton_match_the_loop(dtype, monkeypatch, float32_products):
    """Float experts on the path they take on GPUs (`triton_mlp`) == the per-expert loop."""
    net = DiffusionGemma(preset("tiny")).init_weights(0).to(dtype)
    experts = net.layers[1].experts
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(13, net.config.hidden_size, generator=gen).to(dtype)  # [N, H]
    weights, index = net.layers[1].router(x)
    monkeypatch.setattr(layers, "EXPERTS_IMPL", "loop")
    loop = experts(x, weights, index)
    monkeypatch.setattr(layers, "EXPERTS_IMPL", "auto")
    monkeypatch.setattr(layers, "triton_ok", lambda xs: True)  # as on a GPU; the interpreter runs the CPU tensors
    _close(experts(x, weights, index), loop, dtype, products=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [88, 256])
def test_fused_norm_matches_the_pytorch_norm(d, dtype):
    """One launch per norm == the unfused float32 arithmetic, with and without weight and residual (on CPU tensors
    `rms_norm` itself takes the PyTorch path)."""
    x = (_randn(3, 5, d, seed=d) * 3).to(dtype)
    weight = (1 + _randn(d, seed=1) * 0.1).to(dtype)
    residual = _randn(3, 5, d, seed=2).to(dtype)
    for w, r in [(None, None), (weight, None), (weight, residual), (None, residual)]:
        _close(triton_norm.rms_norm(x, w, 1e-6, r), rms_norm(x, w, 1e-6, r), dtype)
    with pytest.raises(ValueError, match="weight has shape"):
        triton_norm.rms_norm(x, weight[:-1], 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["cos [T, D]", "cos [B, T, D]"])
def test_fused_norm_and_rotation_match_the_separate_ops(per_row, dtype):
    x = _randn(2, 5, 3, 32, seed=3).to(dtype)  # [B, T, H, D]
    weight = (1 + _randn(32, seed=4) * 0.1).to(dtype)
    angles = _randn(*((2, 5) if per_row else (5,)), 32, seed=5)  # [(B,) T, D]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    fused = triton_norm.rms_norm(x, weight, 1e-6, rope=(cos, sin))
    _close(fused, apply_rope(rms_norm(x, weight, 1e-6), cos, sin), dtype)
    with pytest.raises(ValueError, match="power of two"):
        triton_norm.rms_norm(x[..., :24], weight[:24], 1e-6, rope=(cos[..., :24], sin[..., :24]))



def test_triton_is_probed_once_per_gpu_and_a_failing_probe_falls_back(monkeypatch):
    """On a GPU the first call runs the Triton norm once and remembers the answer; a Triton that cannot build or
    launch there gives a warning and the PyTorch paths rather than a failing norm. The probe runs here through the
    interpreter on the CPU; the caching with a stand-in for a CUDA tensor."""
    import dgemma.kernels as kernels

    assert kernels._probe(torch.device("cpu"))  # the real kernel against PyTorch's norm

    def broken(*args, **kw):
        raise RuntimeError("failed to build the driver module")

    monkeypatch.setattr(triton_norm, "rms_norm", broken)
    with pytest.warns(RuntimeWarning, match=r"Triton kernels cannot run on cpu \(RuntimeError: failed to build"):
        assert not kernels._probe(torch.device("cpu"))

    class OnGpu:  # what triton_available reads of a CUDA tensor
        is_cuda, device = True, torch.device("cuda", 3)

    probed, capturing = [], [True]
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "_WORKS", {})
    monkeypatch.setattr(kernels, "_probe", lambda device: probed.append(device) or False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert kernels.triton_available(OnGpu()) and not probed  # inside a capture: no probe, nothing remembered
    capturing[0] = False
    assert not kernels.triton_available(OnGpu()) and not kernels.triton_available(OnGpu())
    assert probed == [torch.device("cuda", 3)] and kernels._WORKS == {torch.device("cuda", 3): False}
