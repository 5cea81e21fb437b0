"""Fast paths equal their plain reference paths: grouped expert matmuls, the chunked sampler."""

import pytest
import torch

from dgemma.config import preset
from dgemma.model import layers
from dgemma.sampling import denoise_step


@pytest.fixture
def experts():
    cfg = preset("tiny", hidden_size=64, moe_intermediate_size=32, num_experts=8, top_k_experts=3)
    module = layers.Experts(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.randn(module.gate_up_proj.shape, generator=gen) * 0.1)
        module.down_proj.copy_(torch.randn(module.down_proj.shape, generator=gen) * 0.1)
    return module


def _run(module, impl, x, weights, index, monkeypatch):
    monkeypatch.setattr(layers, "EXPERTS_IMPL", impl)
    module.zero_grad()
    x = x.clone().requires_grad_(True)
    out = module(x, weights, index)
    out.square().sum().backward()
    return out.detach(), x.grad, module.gate_up_proj.grad.clone(), module.down_proj.grad.clone()


def test_grouped_experts_equal_the_per_expert_loop(experts, monkeypatch):
    if not layers._grouped_ok(torch.zeros(1, 64), experts.gate_up_proj, experts.down_proj):
        pytest.skip("this PyTorch build has no usable torch._grouped_mm on this device")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 64, generator=gen)
    index = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(50)])
    index[:, 0] = 2  # an expert with many tokens, and (likely) some with none
    weights = torch.rand(50, 3, generator=gen)
    loop = _run(experts, "loop", x, weights, index, monkeypatch)
    grouped = _run(experts, "grouped", x, weights, index, monkeypatch)
    for a, b in zip(loop, grouped):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_chunked_sampler_equals_one_chunk():
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 16, 300, generator=gen) * 6
    current = torch.randint(0, 300, (2, 16), generator=gen)
    kw = dict(entropy_bound=0.5, t_min=0.4, t_max=0.8)
    whole = denoise_step(raw.clone(), current, 3, 8, generator=torch.Generator().manual_seed(5), chunk_rows=10_000,
                         **kw)
    chunked = denoise_step(raw.clone(), current, 3, 8, generator=torch.Generator().manual_seed(5), chunk_rows=7, **kw)
    for name in ("logits", "argmax", "entropy", "accepted", "accepted_canvas", "canvas"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
