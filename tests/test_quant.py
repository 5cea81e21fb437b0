"""Quantized formats, kernels and modules: layouts, fused == reference, accuracy of the logits, memory of 26B-A4B."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dgemma.api import Model
from dgemma.config import preset
from dgemma.kernels import dequant_matmul as kernels
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.quant import QTensor, dequantize, quantize_model
from dgemma.quant.convert import resident_bytes
from dgemma.quant.formats import group_for, pack_int4, quantize, quantized_nbytes, unpack_int4
from dgemma.quant.modules import QuantEmbedding, QuantExperts, QuantLinear, QuantWeight


def _weight(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def _fp8(w: torch.Tensor) -> QTensor:
    scale = w.abs().amax(-1, keepdim=True) / 448  # one scale per row
    return QTensor("fp8", (w / scale).to(torch.float8_e4m3fn), scale)


def int8_with_offsets(w: torch.Tensor, group: int | None = 32) -> QTensor:
    """w [..., N, K] as int8 codes 0..31 with float16 scales and offsets per group (None: per row), the form GGUF's
    Q5_1 and Q5_K blocks load in."""
    g = w.unflatten(-1, (-1, group or w.shape[-1]))  # [..., N, groups, G]
    low = g.amin(-1)
    scale, offset = ((g.amax(-1) - low) / 31).half(), low.half()  # [..., N, groups] each
    codes = ((g - offset.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 31)
    return QTensor("int8", codes.to(torch.int8).flatten(-2), scale, offset)


def _quantized(w: torch.Tensor, kind: str, group: int | None) -> QTensor:
    """`quantize`, plus "fp8" (per row) and "int8+offset" (`int8_with_offsets`), which it does not make."""
    if kind == "fp8":
        return _fp8(w)
    return int8_with_offsets(w, group) if kind == "int8+offset" else quantize(w, kind, group)


@pytest.mark.parametrize("kind, group, bound", [("int8", None, 0.01), ("int8", 32, 0.01), ("int4", 32, 0.09),
                                                ("int4", 64, 0.095), ("int4", 128, 0.1)])
def test_quantize_error_and_shapes(kind, group, bound):
    w = _weight(3, 40, 256)
    q = quantize(w, kind, group)
    g = group or 256
    assert q.shape == w.shape and q.group_size == g
    assert q.scale.shape == (3, 40, 256 // g)
    assert q.nbytes == quantized_nbytes(tuple(w.shape), kind, group)
    err = (dequantize(q) - w).norm() / w.norm()
    assert err < bound
    if kind == "int8":  # every value is within half a step, and a dequantized weight quantizes to itself
        assert ((dequantize(q) - w).abs() <= q.scale.repeat_interleave(g, -1) / 2 + 1e-9).all()
        assert torch.equal(quantize(dequantize(q), kind, group).codes, q.codes)


def test_int4_layout_is_half_group_nibbles():
    """Byte j of a group holds input j (low nibble) and input j + G/2 (high nibble): Q4_0's layout for G = 32."""
    codes = torch.arange(64, dtype=torch.uint8).remainder(16).view(1, 64)
    packed = pack_int4(codes, 32)
    assert packed.shape == (1, 32)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 16] << 4)
    assert packed[0, 16] == codes[0, 32] | (codes[0, 48] << 4)
    assert torch.equal(unpack_int4(packed, 32), codes)


def test_group_size_falls_back_to_a_divisor():
    assert group_for(2816, 128) == 128
    assert group_for(704, 128) == 88  # the released expert down_proj rows
    assert group_for(2112, 128) == 96
    assert group_for(32, 64) == 32
    with pytest.raises(ValueError, match="even length"):
        group_for(15, None)
    with pytest.raises(ValueError, match="int8 or int4"):
        quantize(_weight(4, 8), "int3", None)
    with pytest.raises(ValueError, match="group size"):
        quantize(_weight(4, 8), "int4", None)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8", "int8+offset"])
@pytest.mark.parametrize("dtype, cpu_bf16", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_fused_kernels_match_reference(kind, dtype, cpu_bf16, monkeypatch):
    w = _weight(96, 128, seed=1)
    q = _quantized(w, kind, 32)
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 128 * 40)  # several tiles, the last one short
    monkeypatch.setattr(kernels, "DECODE_ELEMENTS", 128 * 7)  # each decoded in parts, the last one short
    monkeypatch.setattr(kernels, "CPU_BF16", cpu_bf16)  # float32 multiplied as bfloat16, as on CPUs with bf16 hardware
    monkeypatch.setattr(kernels, "BF16_MIN_WORK", 0)  # however small the product
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 128, generator=gen).to(dtype)
    exact = dtype == torch.float32 and not cpu_bf16
    tol = dict(rtol=1e-5, atol=1e-6) if exact else dict(rtol=2e-2, atol=2e-2)
    for got, want in ((kernels.linear(x, q), kernels.linear_reference(x, q)),
                      (kernels.matmul(x[0, :3, :96], q), kernels.matmul_reference(x[0, :3, :96], q))):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)
        if not exact:  # bfloat16's rounding, no worse
            assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    ids = torch.tensor([[0, 95, 7], [3, 3, 50]])
    assert torch.equal(kernels.embedding(ids, q, dtype), F.embedding(ids, dequantize(q, dtype)))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_kept_decode_buffers_leave_gradients_and_earlier_results_intact(kind, monkeypatch):
    """Tiles are decoded into one kept buffer, except when autograd may save the weight: gradients through several
    tiles and grouped experts equal the reference's, and a result computed earlier is not changed by later calls."""
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 128 * 40)  # three tiles
    monkeypatch.setattr(kernels, "EXPERT_TILE_ELEMENTS", 2 * 48 * 64)  # three expert tiles
    q = quantize(_weight(96, 128, seed=5), kind, 32)
    stacked = quantize(_weight(5, 48, 64, seed=6), kind, 32)
    counts = torch.tensor([3, 0, 4, 1, 2])
    gen = torch.Generator().manual_seed(7)
    for fused, reference, x, args in [
            (kernels.linear, kernels.linear_reference, torch.randn(2, 5, 128, generator=gen), (q,)),
            (kernels.matmul, kernels.matmul_reference, torch.randn(3, 96, generator=gen), (q,)),
            (lambda xs, w: kernels.grouped_linear(xs, counts, w),
             lambda xs, w: torch.cat([kernels.linear_reference(part, w.map(lambda t, e=e: t[e]))
                                      for e, part in enumerate(xs.split(counts.tolist()))]),
             torch.randn(10, 64, generator=gen), (stacked,))]:
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        probe = torch.randn(fused(x, *args).shape, generator=gen)
        (fused(ours, *args) * probe).sum().backward()
        (reference(theirs, *args) * probe).sum().backward()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)
        first = fused(x, *args)
        kept = first.clone()
        fused(torch.randn(x.shape, generator=gen), *args)
        assert torch.equal(first, kept)


def test_kept_decode_buffers_work_in_and_out_of_inference_mode():
    q = quantize(_weight(96, 128, seed=8), "int4", 32)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(9))
    want = kernels.linear_reference(x, q)
    kernels._BUFFERS.__dict__.clear()  # the first buffer is made inside inference mode
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x, q), want)
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear(x, q), want)
    torch.testing.assert_close(kernels.linear(x, q), want)


def test_cpu_bfloat16_products_only_for_large_float32_products(monkeypatch):
    monkeypatch.setattr(kernels, "CPU_BF16", True)
    x = torch.zeros(4, 8)
    assert kernels._compute_dtype(x, kernels.BF16_MIN_WORK - 1) == torch.float32
    assert kernels._compute_dtype(x, kernels.BF16_MIN_WORK) == torch.bfloat16
    assert kernels._compute_dtype(x.half(), kernels.BF16_MIN_WORK) == torch.float16
    monkeypatch.setattr(kernels, "CPU_BF16", False)
    assert kernels._compute_dtype(x, kernels.BF16_MIN_WORK) == torch.float32


@pytest.mark.parametrize("kind, group", [("int8", None), ("int4", 32), ("fp8", None), ("int8+offset", None),
                                         ("int8+offset", 32)])
@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_grouped_experts_match_expert_by_expert(kind, group, cpu_bf16, monkeypatch):
    w = _weight(5, 48, 64, seed=3)  # [E, N, K]
    q = _quantized(w, kind, group)
    monkeypatch.setattr(kernels, "EXPERT_TILE_ELEMENTS", 2 * 48 * 64)  # two experts per tile, the last tile short
    monkeypatch.setattr(kernels, "DECODE_ELEMENTS", 64 * 10)  # decoded in parts that straddle experts
    monkeypatch.setattr(kernels, "CPU_BF16", cpu_bf16)
    monkeypatch.setattr(kernels, "BF16_MIN_WORK", 0)
    xs = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    assert kernels.grouped_ok(xs, q)
    tol = dict(rtol=2e-2, atol=2e-2) if cpu_bf16 else dict(rtol=1e-5, atol=1e-6)
    # expert 1 and the whole last tile have no rows; then every row in one tile (its product is the output)
    for counts in (torch.tensor([3, 0, 4, 1, 0]), torch.tensor([0, 0, 5, 3, 0])):
        got = kernels.grouped_linear(xs, counts, q)
        rows = torch.repeat_interleave(torch.arange(5), counts)
        want = torch.stack([kernels.linear_reference(x, q.map(lambda t, e=e: t[e]))
                            for x, e in zip(xs, rows.tolist())])
        assert got.shape == (8, 48) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, **tol)
    assert not kernels.grouped_ok(xs[:, :58], quantize(_weight(2, 48, 58), "int8", None))  # rows not 16-byte aligned


def test_quant_weight_dispatches_and_refuses_the_rest(float32_products):
    q = quantize(_weight(4, 16, 32), "int4", 32)
    w = QuantWeight(q, torch.float32)
    assert w.shape == (4, 16, 32) and w.dtype == torch.float32 and w.device.type == "cpu"
    x = torch.randn(3, 32)
    torch.testing.assert_close(F.linear(x, w[2]), x @ dequantize(q)[2].t())
    with pytest.raises(TypeError, match="does not support"):
        torch.exp(w)


def _realistic(cfg, seed=0) -> DiffusionGemma:
    """Random weights at the scales of a trained model: projections N(0, 0.02); each block adds ~30% to the residual
    stream (post-norm weights 0.3), attention logits O(1) (q/k norm weights 0.35, since attention is unscaled), a
    decided router (projection std 1) and an embedding giving logits of std ~1."""
    net = DiffusionGemma(cfg).init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "q_norm" in name or "k_norm" in name:
                p.copy_(0.35 * (1 + 0.2 * noise))
            elif ".post_" in name and name.endswith("norm.weight"):
                p.copy_(0.3 * (1 + 0.2 * noise))
            elif name.endswith("norm.weight") or "scale" in name:
                p.copy_(1 + 0.2 * noise)
            elif "router.proj" in name:
                p.copy_(noise)
            elif "embed" in name:
                p.copy_(0.1 * noise)
    return net


ACCURACY_CFG = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4)


@pytest.fixture(scope="module")
def accuracy_model():
    cfg = preset("tiny", **ACCURACY_CFG)
    net = _realistic(cfg)
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, cfg.vocab_size, (2, 20), generator=gen)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=gen)
    return net, prompt, canvas, Model(net).canvas_logits(prompt, canvas)


def _cosine(accuracy_model, kind, group, dense=None) -> float:
    net, prompt, canvas, ref = accuracy_model
    qnet = quantize_model(copy.deepcopy(net), kind, group, dense=dense)
    assert isinstance(qnet.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(qnet.layers[0].experts, QuantExperts)
    assert isinstance(qnet.embed_tokens, QuantEmbedding)
    assert not isinstance(qnet.layers[0].router.proj, QuantLinear)  # the router stays float
    out = Model(qnet).canvas_logits(prompt, canvas)
    cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    print(f"{kind} group {group}, dense layers {dense or kind}: logits cosine similarity {cos:.5f}")
    return cos


@pytest.mark.parametrize("kind, group, floor", [("int8", None, 0.999), ("int4", 64, 0.99)])
def test_logits_cosine_similarity(accuracy_model, kind, group, floor):
    assert _cosine(accuracy_model, kind, group) >= floor


def test_int8_dense_layers_bring_int4_closer(accuracy_model):
    """int4 experts with int8 attention and dense MLPs: closer to float than all-int4, within the int8 floor."""
    mixed = _cosine(accuracy_model, "int4", 64, "int8")
    assert _cosine(accuracy_model, "int4", 64) < mixed and mixed >= 0.999


@pytest.mark.parametrize("grouped", [True, False])
def test_quantized_model_equals_its_dequantized_float_twin(accuracy_model, float32_products, grouped, monkeypatch):
    """The fused quantized modules compute exactly what a float model holding the dequantized weights computes (in
    float32 throughout: the bfloat16 products of AMX CPUs are checked by the kernel test and the cosine floors), with
    the experts in grouped products or expert by expert."""
    if not grouped:
        monkeypatch.setattr(kernels, "grouped_ok", lambda xs, q: False)
    net, prompt, canvas, _ = accuracy_model
    qnet = quantize_model(copy.deepcopy(net), "int4", 32)
    twin = copy.deepcopy(net)
    state = twin.state_dict()
    for name, module in qnet.named_modules():
        for weight in getattr(module, "_kinds", {}):
            state[f"{name}.{weight}"].copy_(dequantize(module.qtensor(weight)))
    torch.testing.assert_close(Model(qnet).canvas_logits(prompt, canvas), Model(twin).canvas_logits(prompt, canvas),
                               rtol=1e-4, atol=1e-4)


def test_26b_a4b_int4_resident_weights_fit():
    """int4 (group 64) with an int8 embedding/head: <= 15 GB of resident weights for the released shapes, counted
    from every tensor's shape; the byte formula is checked against real quantization of full-size tensors."""
    cfg = preset("26b-a4b")
    total = resident_bytes(cfg, "int4", 64, "int8", float_bytes=2)
    params, _ = cfg.parameter_counts()
    print(f"26b-a4b int4/64: {total / 1e9:.2f} GB resident, {total / params:.3f} bytes/parameter")
    assert total <= 15e9
    assert resident_bytes(cfg, "int8", None, "int8", float_bytes=2) <= 27e9
    for shape, kind, group in [((4096, 2816), "int4", 64),  # q_proj of a sliding layer
                               ((2, 2816, 704), "int4", 64),  # two experts' down_proj
                               ((2, 2816, 704), "int4", 128),  # ... where group 128 falls back to 88
                               ((1408, 2816), "int8", None),  # one expert's gate_up_proj
                               ((2048, 2816), "int8", None)]:  # embedding rows
        q = quantize(torch.randn(shape) * 0.02, kind, group)
        assert q.nbytes == quantized_nbytes(shape, kind, group)


@pytest.mark.parametrize("kind, group, floor", [("int8", None, 0.999), ("int4", 64, 0.99)])
def test_bundled_model_logits_cosine_similarity(kind, group, floor):
    """The shipped model on held-out code (textwrap's source), half its canvas noised: quantized logits stay within
    the format's cosine floor of the float32 ones."""
    import textwrap

    import dgemma

    model = dgemma.load()
    ids = model.tokenizer.encode(open(textwrap.__file__, encoding="utf-8").read()[:3000], add_bos=True)
    c = model.config.canvas_length
    prompt = torch.tensor([ids[:200], ids[300:500]])
    clean = torch.tensor([ids[200:200 + c], ids[500:500 + c]])
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, model.config.vocab_size, clean.shape, generator=gen)
    canvas = torch.where(torch.rand(clean.shape, generator=gen) < 0.5, noise, clean)
    ref = model.canvas_logits(prompt, canvas)
    out = Model(quantize_model(copy.deepcopy(model.net), kind, group)).canvas_logits(prompt, canvas)
    cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    print(f"bundled model, {kind} group {group}: logits cosine similarity {cos:.5f}")
    assert cos >= floor


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_per_channel_float16_products_do_not_overflow(kind):
    """float16 sums of raw codes (up to 127 or 448 times each activation) would pass float16's 65504: per-channel
    weights are dequantized before a float16 product, which then matches the float32 one to float16's rounding."""
    w = _weight(3, 32, 256, seed=5)  # [E, N, K]
    q = _quantized(w, kind, None)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(6)) * 60  # [M, K]
    want = kernels.linear_reference(x, q.map(lambda t: t[0]))
    got = kernels.linear(x.half(), q.map(lambda t: t[0]))
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    counts = torch.tensor([2, 0, 4])
    assert kernels.grouped_ok(x.half(), q)
    grouped = kernels.grouped_linear(x.half(), counts, q)
    rows = torch.repeat_interleave(torch.arange(3), counts)
    want = torch.stack([kernels.linear_reference(r, q.map(lambda t, e=e: t[e])) for r, e in zip(x, rows.tolist())])
    assert torch.isfinite(grouped).all()
    torch.testing.assert_close(grouped.float(), want, rtol=1e-2, atol=1e-2)
