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


def _replaying_capture(calls, warm_up: bool):
    """A stand-in for CUDA graph capture on the CPU: `replay` reruns the captured function into the same output
    tensor, as a graph replay rewrites its static output."""
    def capture(fn, device):
        calls.append("capture")
        out = fn()

        def replay():
            calls.append("replay")
            out.copy_(fn())
        return replay, out, fn() if warm_up else None
    return capture


def _settling_apart(model, prompts, kw) -> float:
    """A confidence threshold at which the rows of `prompts` settle at different steps: midway between the rows'
    mean entropies at step 4 (entropy falls step by step as the temperature does)."""
    from dgemma import sampling

    entropies = []
    original = sampling.StopRule.__call__

    def spy(rule, argmax, entropy):
        entropies.append(entropy.mean(dim=-1))
        return original(rule, argmax, entropy)
    sampling.StopRule.__call__ = spy
    try:
        model.generate(prompts, **kw, confidence_threshold=1e-9)
    finally:
        sampling.StopRule.__call__ = original
    return entropies[3].mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("warm_up", [True, False])
def test_graph_replayed_steps_give_the_eager_tokens(dtype, warm_up, monkeypatch):
    """The canvas decoder's buffers and hand-over (inputs copied in, the output aliased by the next replay, settled
    rows keeping the previous step's logits) leave every token as the eager steps make it."""
    from dgemma.api import Model
    from dgemma.engine import graphs
    from dgemma.model.diffusion_gemma import DiffusionGemma

    model = Model(DiffusionGemma(preset("tiny")).init_weights(3).to(dtype))
    prompts = [[5, 6, 7], [8, 9]]
    kw = dict(max_new_tokens=model.config.canvas_length, max_denoising_steps=6, seed=4, stability_threshold=0)
    kw["confidence_threshold"] = _settling_apart(model, prompts, kw)
    eager = model.generate(prompts, **kw)
    assert eager.steps[0] != eager.steps[1], "the rows should settle at different steps"
    calls = []
    monkeypatch.setattr(graphs, "BUCKET_CANVASES", 0)  # no padding: bfloat16 sums stay exactly the eager ones
    monkeypatch.setattr(graphs, "use_graphs", lambda device: True)
    monkeypatch.setattr(graphs.CanvasDecoder, "capture", staticmethod(_replaying_capture(calls, warm_up)))
    replayed = model.generate(prompts, **kw)
    assert calls.count("capture") == 2  # the first step's pass and the self-conditioned one
    assert "replay" in calls
    assert replayed.token_ids == eager.token_ids and replayed.steps == eager.steps
    # A run of the same shape (other prompts of the same lengths) refills the graphs' static cache, captures nothing.
    others = [[15, 16, 17], [18, 19]]
    monkeypatch.setattr(graphs, "use_graphs", lambda device: False)
    eager_others = model.generate(others, **kw)
    monkeypatch.setattr(graphs, "use_graphs", lambda device: True)
    calls.clear()
    again = model.generate(others, **kw)
    assert calls and "capture" not in calls
    assert again.token_ids == eager_others.token_ids and again.token_ids != eager.token_ids
    # Canvases after the first see a longer cache: each gets its own graphs (the first reuses the ones above).
    kw["max_new_tokens"] = 3 * model.config.canvas_length
    calls.clear()
    monkeypatch.setattr(graphs, "use_graphs", lambda device: False)
    eager = model.generate(prompts, **kw)
    monkeypatch.setattr(graphs, "use_graphs", lambda device: True)
    replayed = model.generate(prompts, **kw)
    assert len(replayed.steps[0]) == 3 and calls.count("capture") == 4
    # New weight storage (quantizing in place, reloading) gets new graphs: a graph reads the storage it was captured on.
    up = model.net.layers[0].mlp.up_proj
    up.weight = torch.nn.Parameter(up.weight.detach() * 2, requires_grad=False)
    calls.clear()
    model.generate(prompts, **kw)
    assert calls.count("capture") == 6
    assert replayed.token_ids == eager.token_ids and replayed.steps == eager.steps


def test_a_generation_nested_in_a_step_callback_leaves_the_outer_ones_graphs_alone(monkeypatch):
    """A generation run from `on_step` (or another thread) while a canvas holds the graphs decodes eagerly: the
    outer canvas's static cache and last output stay its own, so both give their eager tokens."""
    from dgemma.api import Model
    from dgemma.engine import graphs
    from dgemma.model.diffusion_gemma import DiffusionGemma

    model = Model(DiffusionGemma(preset("tiny")).init_weights(5))
    kw = dict(max_new_tokens=model.config.canvas_length, max_denoising_steps=4, seed=1, confidence_threshold=1e-9)
    inner = []

    def nested(event):
        if event.step == 2:  # the same shape as the outer generation
            inner.append(model.generate([[9, 9, 9]], **kw).token_ids)

    outer_eager = model.generate([[5, 6, 7]], **kw, on_step=nested).token_ids
    calls = []
    monkeypatch.setattr(graphs, "use_graphs", lambda device: True)
    monkeypatch.setattr(graphs.CanvasDecoder, "capture", staticmethod(_replaying_capture(calls, True)))
    assert model.generate([[5, 6, 7]], **kw, on_step=nested).token_ids == outer_eager
    assert inner[0] == inner[1] and "replay" in calls
    calls.clear()
    assert model.generate([[9, 9, 9]], **kw).token_ids == inner[0] and "replay" in calls  # graphs free again


def test_canvases_of_one_generation_share_bucketed_graphs(monkeypatch):
    """Caches padded to BUCKET_CANVASES canvases (positions kept by row offsets): later canvases replay the first
    canvas's graphs, a prompt past a bucket boundary gets its own, and tokens equal the eager ones (float64, where
    the padding's rounding cannot flip a near-tie)."""
    from dgemma.api import Model
    from dgemma.engine import graphs
    from dgemma.model.diffusion_gemma import DiffusionGemma

    model = Model(DiffusionGemma(preset("tiny")).init_weights(3).to(torch.float64))
    kw = dict(max_new_tokens=3 * model.config.canvas_length, max_denoising_steps=4, seed=2, stability_threshold=0,
              confidence_threshold=1e-9)
    bucket = graphs.BUCKET_CANVASES * model.config.canvas_length
    cases = [[[5, 6, 7], [8, 9]], [list(range(3, 3 + bucket + 4)), [8, 9]]]
    eager = [model.generate(p, **kw) for p in cases]
    calls = []
    monkeypatch.setattr(graphs, "use_graphs", lambda device: True)
    monkeypatch.setattr(graphs.CanvasDecoder, "capture", staticmethod(_replaying_capture(calls, True)))
    for prompts, expected in zip(cases, eager):
        calls.clear()
        replayed = model.generate(prompts, **kw)
        assert replayed.token_ids == expected.token_ids and len(replayed.steps[0]) == 3
        assert calls.count("capture") == 2  # one bucket for all three canvases: two graphs, then replays only


def test_failed_capture_falls_back_to_eager_steps(monkeypatch):
    from dgemma.api import Model
    from dgemma.engine import graphs
    from dgemma.model.diffusion_gemma import DiffusionGemma

    def broken(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    model = Model(DiffusionGemma(preset("tiny")).init_weights(3))
    eager = model.generate([[5, 6, 7]], max_denoising_steps=4, seed=1)
    monkeypatch.setattr(graphs, "use_graphs", lambda device: True)
    monkeypatch.setattr(graphs.CanvasDecoder, "capture", staticmethod(broken))
    with pytest.warns(RuntimeWarning, match="capture of the denoising step failed"):
        fallback = model.generate([[5, 6, 7]], max_denoising_steps=4, seed=1)
    assert fallback.token_ids == eager.token_ids
    assert model.net in graphs._failed  # this network decodes eagerly from now on; another still tries to capture
    other = Model(DiffusionGemma(preset("tiny")).init_weights(4))
    with pytest.warns(RuntimeWarning, match="capture of the denoising step failed"):
        other.generate([[5, 6, 7]], max_denoising_steps=2, seed=1)


def test_unknown_experts_path_is_named(experts, monkeypatch):
    monkeypatch.setattr(layers, "EXPERTS_IMPL", "fast")
    with pytest.raises(ValueError, match="DGEMMA_EXPERTS='fast': choose one of auto, triton, grouped, loop"):
        experts(torch.zeros(2, 64), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long))


def test_repeated_key_value_heads_attend_as_grouped_query_attention(monkeypatch):
    """The CUDA form of attention (key/value heads repeated) == enable_gqa's broadcast, here on the CPU."""
    cfg = preset("tiny")
    attn = layers.Attention(cfg, 0)
    gen = torch.Generator().manual_seed(2)
    heads, kv, d = cfg.num_attention_heads, attn.kv_heads, attn.head_dim
    q, k, v = (torch.randn(2, n, 5 if n == heads else 9, d, generator=gen) for n in (heads, kv, kv))
    mask = torch.rand(2, 1, 5, 9, generator=gen) > 0.3
    mask[..., 0] = True  # every query sees at least one slot
    grouped = attn.attend(q, k, v, mask)
    monkeypatch.setattr(layers, "repeat_kv", lambda q: True)
    torch.testing.assert_close(attn.attend(q, k, v, mask), grouped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_into_reused_buffers_gives_the_same_logits(dtype):
    """`decode(..., out=, probs=)` (what the eager steps use, to spare a CPU the page faults of fresh [B, C, V]
    buffers) gives the very logits of a plain call, with and without self-conditioning, and writes them into `out`."""
    from dgemma.bench import random_network
    from dgemma.engine.cache import KVCache

    cfg = preset("tiny")
    net = random_network(cfg, torch.device("cpu"), dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, cfg.vocab_size, (2, 9), generator=gen)
    canvas = torch.randint(3, cfg.vocab_size, (2, cfg.canvas_length), generator=gen)
    cache = KVCache(cfg, 2)
    net.encode(prompt, cache)
    first = net.decode(canvas, cache)
    second = net.decode(canvas, cache, first * 1.7)
    out, probs = torch.full_like(first, float("nan")), torch.full_like(first, float("nan"))
    assert net.decode(canvas, cache, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, first)
    again = net.decode(canvas, cache, first * 1.7, out=out, probs=probs)
    assert again.data_ptr() == out.data_ptr() and torch.equal(again, second)
