"""int4 experts through PyTorch's packed CPU kernel: the layout conversions, the products against dequantize-then-
matmul, and quantized experts that store their codes in the kernel's order."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dgemma.api import Model
from dgemma.config import preset
from dgemma.kernels import int4_cpu
from dgemma.quant import QTensor, dequantize, quantize_model
from dgemma.quant.formats import quantize, unpack_int4
from dgemma.quant.modules import QuantExperts
from test_quant import _realistic

kernel = pytest.mark.skipif(not int4_cpu._capable(), reason="no AVX2 or AVX-512 int4 kernel on this CPU")


@pytest.mark.parametrize("experts, n, k, group", [(3, 48, 96, 32), (2, 64, 704, 64), (2, 128, 256, 128)])
def test_kernel_layout_is_pytorchs_packing_and_converts_back_exactly(experts, n, k, group):
    q = quantize(torch.randn(experts, n, k, generator=torch.Generator().manual_seed(n)), "int4", group)
    packed = int4_cpu.to_kernel_layout(q.codes, group)
    expected = torch.stack([torch._convert_weight_to_int4pack_for_cpu(unpack_int4(c, group).to(torch.int32), 1)
                            for c in q.codes])
    assert torch.equal(packed, expected) and not torch.equal(packed, q.codes)
    assert torch.equal(int4_cpu.from_kernel_layout(packed, group), q.codes)


@kernel
@pytest.mark.parametrize("group", [32, 64])
def test_kernel_products_match_dequantize_then_matmul(group):
    gen = torch.Generator().manual_seed(group)
    q = quantize(torch.randn(4, 96, 128, generator=gen), "int4", group)
    counts = torch.tensor([5, 0, 1, 7])  # an expert without rows, one with a single row
    xs = torch.randn(int(counts.sum()), 128, generator=gen)
    out = int4_cpu.grouped_linear(xs, counts, QTensor("int4", int4_cpu.to_kernel_layout(q.codes, group), q.scale,
                                                      q.offset))
    w = dequantize(q)
    ends = counts.cumsum(0).tolist()
    ref = torch.cat([xs[end - c:end] @ w[e].t() for e, (c, end) in enumerate(zip(counts.tolist(), ends))])
    assert out.dtype == xs.dtype and out.shape == ref.shape
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2  # bfloat16 activations and scales


@pytest.fixture(scope="module")
def int4_pair():
    """A tiny realistic model and its int4 (group 32) copy, built with the kernel turned off and on."""
    cfg = preset("tiny", hidden_size=128, intermediate_size=256, moe_intermediate_size=64)
    net = _realistic(cfg)
    saved = int4_cpu.ENABLED
    try:
        int4_cpu.ENABLED = False
        plain = quantize_model(copy.deepcopy(net), "int4", 32)
        int4_cpu.ENABLED = True
        packed = quantize_model(copy.deepcopy(net), "int4", 32)
    finally:
        int4_cpu.ENABLED = saved
    return net, plain, packed


def _logits(net):
    gen = torch.Generator().manual_seed(3)
    cfg = net.config
    return Model(net).canvas_logits(torch.randint(3, cfg.vocab_size, (2, 12), generator=gen),
                                    torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=gen))


@kernel
def test_quantized_experts_store_the_kernel_layout_and_give_their_own_back(int4_pair):
    _, plain, packed = int4_pair
    for a, b in zip(plain.modules(), packed.modules()):
        if isinstance(b, QuantExperts):
            assert b._kernel_layout == {"gate_up_proj", "down_proj"} and not a._kernel_layout
            for name in b._kernel_layout:
                assert name + "_codes" not in b._buffers
                assert not torch.equal(b._buffers[name + "_kernel_codes"], a._buffers[name + "_codes"])
                assert torch.equal(b.qtensor(name).codes, a.qtensor(name).codes)
                view = getattr(b, name)  # a QuantWeight whose data is converted only when used
                assert view.shape == getattr(a, name).shape and torch.equal(view.q.codes, a.qtensor(name).codes)
    ours, theirs = packed.state_dict(), plain.state_dict()  # the same bytes, the kernel's codes under their own name
    assert sum(t.nbytes for t in ours.values()) == sum(t.nbytes for t in theirs.values())
    assert {k.replace("_kernel_codes", "_codes") for k in ours} == theirs.keys()


@kernel
def test_kernel_experts_give_the_logits_of_the_dequantizing_ones(int4_pair):
    net, plain, packed = int4_pair
    ref, base, out = _logits(net), _logits(plain), _logits(packed)
    cos = F.cosine_similarity(out.flatten(), base.flatten(), dim=0).item()
    assert cos > 0.9999, cos
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item() >= 0.99  # int4's own floor


@kernel
def test_moving_restores_the_layout_and_autograd_takes_the_dequantizing_path(int4_pair):
    _, plain, packed = int4_pair
    moved = copy.deepcopy(packed)
    experts = moved.layers[0].experts
    codes = experts.qtensor("down_proj").codes
    moved.to("cpu")  # back to dgemma's layout and, still on a CPU the kernel supports, into the kernel's again
    assert experts._kernel_layout == {"gate_up_proj", "down_proj"}
    assert torch.equal(experts.qtensor("down_proj").codes, codes)
    torch.testing.assert_close(_logits(moved), _logits(packed), rtol=0, atol=0)

    xs = torch.randn(6, moved.config.hidden_size, requires_grad=True)
    counts = torch.tensor([3, 3] + [0] * (moved.config.num_experts - 2))
    out = experts._mlp(xs, counts)
    # The kernel has no backward: this only works through the dequantizing products. (A weighted sum, as routing
    # gives: torch._grouped_mm's backward refuses the zero-stride gradient of a plain sum.)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    reference = plain.layers[0].experts._mlp(xs.detach(), counts)
    torch.testing.assert_close(out.detach(), reference, rtol=0, atol=0)
    assert xs.grad is not None and xs.grad.abs().sum() > 0


def test_the_kernel_can_be_turned_off(int4_pair, monkeypatch):
    net, _, _ = int4_pair
    monkeypatch.setattr(int4_cpu, "ENABLED", False)
    qnet = quantize_model(copy.deepcopy(net), "int4", 32)
    assert not any(getattr(m, "_kernel_layout", None) for m in qnet.modules())


@kernel
def test_staying_on_the_cpu_keeps_the_kernel_layout_without_converting(int4_pair, monkeypatch):
    _, _, packed = int4_pair
    moved = copy.deepcopy(packed)
    calls = []
    monkeypatch.setattr(int4_cpu, "from_kernel_layout", lambda *a: calls.append(a))
    moved.float().share_memory()
    experts = moved.layers[0].experts
    assert experts._kernel_layout == {"gate_up_proj", "down_proj"} and not calls
    assert experts._buffers["gate_up_proj_kernel_codes"].is_shared()


@kernel
def test_expert_by_expert_products_convert_one_expert_at_a_time(int4_pair, monkeypatch):
    """With autograd recording and grouped products refused, each expert's product converts only that expert."""
    from dgemma.kernels import dequant_matmul

    _, plain, packed = int4_pair
    experts, reference = packed.layers[0].experts, plain.layers[0].experts
    converted = []
    convert = int4_cpu.from_kernel_layout
    monkeypatch.setattr(int4_cpu, "from_kernel_layout", lambda codes, group: converted.append(codes.shape[0]) or
                        convert(codes, group))
    monkeypatch.setattr(dequant_matmul, "grouped_ok", lambda xs, q: False)
    xs = torch.randn(6, packed.config.hidden_size, requires_grad=True)
    counts = torch.tensor([2, 0, 4] + [0] * (packed.config.num_experts - 3))
    out = experts._mlp(xs, counts)
    assert converted == [1, 1, 1, 1]  # two experts with rows, two weights each
    torch.testing.assert_close(out, reference._mlp(xs, counts), rtol=0, atol=0)


@kernel
def test_conversions_work_under_another_default_device(int4_pair):
    _, plain, packed = int4_pair
    with torch.device("meta"):
        codes = packed.layers[0].experts.qtensor("gate_up_proj").codes
    assert codes.device.type == "cpu" and torch.equal(codes, plain.layers[0].experts.qtensor("gate_up_proj").codes)


@kernel
def test_moving_off_the_cpu_converts_back_to_dgemmas_layout(int4_pair):
    """The off-CPU branch, on the meta device (shapes only): the kernel's buffers give way to dgemma's."""
    _, _, packed = int4_pair
    experts = copy.deepcopy(packed).to("meta").layers[0].experts
    assert not experts._kernel_layout
    assert "gate_up_proj_codes" in experts._buffers and "gate_up_proj_kernel_codes" not in experts._buffers
    assert experts._buffers["gate_up_proj_codes"].device.type == "meta"
