"""Shared test fixtures: tiny random DiffusionGemma checkpoints written by the reference implementation."""

from __future__ import annotations

import pytest
import torch

# One small vision tower keeps the reference config cheap and puts vision tensors in the checkpoint to skip.
TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=8, intermediate_size=32)

BASE_TEXT = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, sliding_window=8,
    num_experts=4, top_k_experts=2, moe_intermediate_size=16, max_position_embeddings=2048,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"], eos_token_id=[1, 106 % 128, 50],
)

# Different depths, sliding/full patterns, windows (shorter than the prompts) and head shapes.
CONFIGS = {
    "sfs": dict(layer_types=["sliding_attention", "full_attention", "full_attention"]),
    "ssf": dict(),
    "ssfsf": dict(num_hidden_layers=5, sliding_window=5, num_attention_heads=2, num_key_value_heads=1,
                  num_global_key_value_heads=2, global_head_dim=12,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                               "full_attention"]),
    "f": dict(num_hidden_layers=1, layer_types=["full_attention"], num_experts=6, top_k_experts=3),
}


def perturb(model, seed: int) -> None:
    """Give every weight, norm, router scale and layer scalar a non-trivial random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight") or "scale" in name:
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(noise * (0.5 if "embed" in name else 0.3))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(1 + 0.2 * torch.randn(b.shape, generator=gen))


def reference_checkpoint(directory, name: str = "ssf", seed: int = 0, canvas_length: int = 16, **text):
    """Write a random tiny checkpoint with transformers' save_pretrained; return (path, reference model)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text_config = {**BASE_TEXT, **CONFIGS[name], **text}
    # The reference's plain per-expert loop ("eager") is the documented math; its default grouped_mm path reorders
    # float sums, which is within parity tolerance but can flip a near-tie when sampling.
    cfg = DiffusionGemmaConfig(text_config=text_config, vision_config=TINY_VISION, canvas_length=canvas_length,
                               experts_implementation="eager")
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    perturb(model, seed)
    path = directory / f"{name}-{seed}"
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests use tiny matrices: one thread is several times faster than two fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def float32_products(monkeypatch):
    """Quantized products in float32 even on CPUs whose fused path multiplies float32 as bfloat16 (AMX or AVX-512
    BF16), and int4 experts without PyTorch's bfloat16 int4 kernel: for tests that compare a quantized model with its
    dequantized float twin closely."""
    from dgemma.kernels import dequant_matmul, int4_cpu

    monkeypatch.setattr(dequant_matmul, "CPU_BF16", False)
    monkeypatch.setattr(int4_cpu, "ENABLED", False)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def tiny(ckpt_dir):
    """(path, reference model) for the default tiny config."""
    return reference_checkpoint(ckpt_dir, "ssf", seed=0)
