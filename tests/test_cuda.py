"""GPU checks, skipped where no CUDA device exists: the bf16 network against transformers' on the same GPU, the
engine end to end, captured denoising and token steps against eager ones, the grouped expert matmul against the
per-expert loop, the compiled Triton kernels against dequantize-then-matmul, and a quantized network's logits. Run
them alone (`pytest tests/test_cuda.py`): the Triton interpreter tests set TRITON_INTERPRET=1 for the rest of their
process."""

import copy

import pytest
import torch
import torch.nn.functional as F

import dgemma
from conftest import reference_checkpoint
from dgemma.api import Model
from dgemma.config import preset
from dgemma.engine import graphs
from dgemma.engine.cache import KVCache
from dgemma.kernels import dequant_matmul, triton_dequant
from dgemma.model import layers
from dgemma.quant.formats import quantize
from dgemma.quant.modules import QuantExperts, quantize_model
from test_quant import ACCURACY_CFG, _realistic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"


def _rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest absolute difference as a share of the truth's largest magnitude."""
    return ((out.float().cpu() - truth.float().cpu()).abs().max() / truth.float().abs().max()).item()


def _cosine(out: torch.Tensor, truth: torch.Tensor) -> float:
    return F.cosine_similarity(out.float().cpu().flatten(), truth.float().cpu().flatten(), dim=0).item()


@pytest.mark.parametrize("name", ["ssf", "ssfsf"])
def test_bf16_logits_agree_with_reference_on_gpu(ckpt_dir, name):
    """Both bf16 GPU runs are measured against the reference in float32 on the CPU: ours may not stray further than
    transformers' own bf16 GPU run does (twice its error; its cosine similarity less 0.001)."""
    path, ref = reference_checkpoint(ckpt_dir, name, seed=1, hidden_size=64, intermediate_size=128,
                                     moe_intermediate_size=32)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 128, (2, 30), generator=gen)
    canvas = torch.randint(0, 128, (2, 16), generator=gen)
    with torch.no_grad():
        truth = ref(input_ids=prompt, decoder_input_ids=canvas).logits
        ref_gpu = copy.deepcopy(ref).to(CUDA, torch.bfloat16)
        theirs = ref_gpu(input_ids=prompt.to(CUDA), decoder_input_ids=canvas.to(CUDA)).logits
    ours = dgemma.load(path, device=CUDA, dtype=torch.bfloat16).canvas_logits(prompt, canvas)
    assert ours.device.type == "cuda" and ours.dtype == torch.float32
    ours_err, theirs_err = _rel_err(ours, truth), _rel_err(theirs, truth)
    print(f"{name}: bf16 GPU logits vs float32 reference: ours max rel err {ours_err:.2e} cos "
          f"{_cosine(ours, truth):.5f}; transformers {theirs_err:.2e} cos {_cosine(theirs, truth):.5f}")
    assert ours_err <= 2 * theirs_err + 1e-3
    assert _cosine(ours, truth) >= _cosine(theirs, truth) - 1e-3


def test_generate_on_gpu_is_seeded_and_complete():
    net = _realistic(preset("tiny", **ACCURACY_CFG)).to(CUDA, torch.bfloat16)
    model = Model(net)
    prompts = [[5, 6, 7, 8], [9, 10]]
    kw = dict(max_new_tokens=2 * net.config.canvas_length, max_denoising_steps=8, seed=11)
    first, again = model.generate(prompts, **kw), model.generate(prompts, **kw)
    assert first.token_ids == again.token_ids
    assert all(len(row) <= kw["max_new_tokens"] for row in first.token_ids)
    assert set(first.finish_reasons) <= {"stop", "length"}
    assert all(1 <= s <= 8 for row in first.steps for s in row)


@torch.no_grad()  # as generation runs: the Triton norms, rotations and experts where Triton is installed
def test_graph_replays_match_eager_passes():
    net = _realistic(preset("tiny", **ACCURACY_CFG)).to(CUDA, torch.bfloat16)
    cfg = net.config
    gen = torch.Generator().manual_seed(6)
    cache = KVCache(cfg, 2, CUDA)
    net.encode(torch.randint(3, cfg.vocab_size, (2, 40), generator=gen).to(CUDA), cache)
    decoder = graphs.CanvasDecoder(net, cache)
    assert decoder.graphs
    worst = 0.0
    for step in range(4):  # capture without and with self-conditioning, then replays
        canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=gen).to(CUDA)
        sc = None if step == 0 else (4 * torch.randn(2, cfg.canvas_length, cfg.vocab_size, generator=gen)).to(
            CUDA, torch.bfloat16)
        got = decoder(canvas, sc).clone()
        worst = max(worst, _rel_err(got, net.decode(canvas, cache, sc)))
    assert net not in graphs._failed and len(graphs._graphs[net].passes) == 2
    print(f"CUDA graph replays vs eager decoder passes: max rel err {worst:.2e}")
    assert worst <= 1e-2


def test_graph_replayed_token_steps_match_eager_decoding(monkeypatch):
    """The autoregressive baseline's captured token step: greedy tokens equal the eager steps' on the GPU."""
    from dgemma.engine import ar

    net = _realistic(preset("tiny", **ACCURACY_CFG)).to(CUDA, torch.bfloat16)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    captures = []
    original = ar.TokenStep.capture
    monkeypatch.setattr(ar.TokenStep, "capture", staticmethod(lambda fn, d: captures.append(1) or original(fn, d)))
    replayed = ar.ar_generate(net, prompts, 24, stop_ids=[])
    monkeypatch.setattr(graphs, "use_graphs", lambda device: False)
    eager = ar.ar_generate(net, prompts, 24, stop_ids=[])
    assert captures == [1] and replayed.token_ids == eager.token_ids


@pytest.mark.parametrize("impl", ["triton", "grouped"])
def test_grouped_experts_match_the_per_expert_loop(impl, monkeypatch):
    net = _realistic(preset("tiny", **ACCURACY_CFG)).to(CUDA, torch.bfloat16)
    experts = net.layers[0].experts
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, net.config.hidden_size, generator=gen).to(CUDA, torch.bfloat16)  # [N, H]
    weights, index = net.layers[0].router(x)
    with torch.no_grad():
        monkeypatch.setattr(layers, "EXPERTS_IMPL", impl)
        grouped = experts(x, weights, index)
        monkeypatch.setattr(layers, "EXPERTS_IMPL", "loop")
        loop = experts(x, weights, index)
    err = _rel_err(grouped, loop)
    print(f"experts: {impl} vs per-expert loop, bf16, max rel err {err:.2e}")
    assert err <= 1e-2


# Real DiffusionGemma 26B-A4B projection sizes: attention/dense (2816 inputs) and an expert's down (704 inputs);
# groups of 16 as GGUF's K-quants and IQ types load.
LINEAR = [("int8", None, 2816, 2816), ("int8", None, 2816, 704), ("int4", 64, 1408, 2816), ("int4", 32, 2816, 704),
          ("int4", 128, 1000, 2816), ("int8", 16, 2816, 704)]


@pytest.mark.parametrize("kind, group, n, k", LINEAR)
def test_triton_linear_compiled(kind, group, n, k):
    gen = torch.Generator().manual_seed(n + k)
    q = quantize(torch.randn(n, k, generator=gen) * 0.02, kind, group).map(lambda t: t.to(CUDA))
    for m in (1, 16, 300):
        x = torch.randn(m, k, generator=gen).to(CUDA, torch.bfloat16)
        err = _rel_err(triton_dequant.linear(x, q), dequant_matmul.linear_reference(x, q))
        assert err <= 2e-2, f"{kind} g{group} [{m} x {k}] @ [{n} x {k}]^T: max rel err {err:.2e}"


@pytest.mark.parametrize("kind, group", [("int8", None), ("int4", 64), ("int4", 16)])
def test_triton_grouped_linear_compiled(kind, group):
    gen = torch.Generator().manual_seed(9)
    counts = torch.tensor([0, 33, 1, 0, 250, 7, 16, 0])
    q = quantize(torch.randn(8, 1408, 704, generator=gen) * 0.02, kind, group).map(lambda t: t.to(CUDA))
    xs = torch.randn(int(counts.sum()), 704, generator=gen).to(CUDA, torch.bfloat16)
    y = triton_dequant.grouped_linear(xs, counts.to(CUDA), q)
    start, worst = 0, 0.0
    for e, count in enumerate(counts.tolist()):
        ref = dequant_matmul.linear_reference(xs[start:start + count], q.map(lambda t, e=e: t[e]))
        if count:
            worst = max(worst, _rel_err(y[start:start + count], ref))
        start += count
    print(f"grouped {kind}: max rel err {worst:.2e}")
    assert worst <= 2e-2


@pytest.mark.parametrize("kind, group, floor", [("int8", None, 0.999), ("int4", 64, 0.99)])
def test_quantized_network_on_gpu(kind, group, floor):
    net = _realistic(preset("tiny", **ACCURACY_CFG)).to(CUDA, torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, net.config.vocab_size, (2, 20), generator=gen)
    canvas = torch.randint(0, net.config.vocab_size, (2, net.config.canvas_length), generator=gen)
    base = Model(net).canvas_logits(prompt, canvas)
    qnet = quantize_model(copy.deepcopy(net), kind, group)
    assert isinstance(qnet.layers[0].experts, QuantExperts)
    cos = _cosine(Model(qnet).canvas_logits(prompt, canvas), base)
    print(f"{kind} group {group} on GPU (Triton kernels): logits cosine to bf16 {cos:.5f}")
    assert cos >= floor
