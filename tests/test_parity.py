"""Decoder logits equal transformers' DiffusionGemma on random tiny checkpoints it wrote itself."""

import pytest
import torch

import dgemma
from conftest import CONFIGS, reference_checkpoint

RTOL = 1e-4


def assert_close(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= RTOL * scale, f"max abs error {err:.3g} exceeds {RTOL} x {scale:.3g}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("prompt_len", [5, 40])  # 40 > sliding window and > two canvases of 16
def test_canvas_logits_match_reference(ckpt_dir, name, prompt_len):
    path, ref = reference_checkpoint(ckpt_dir, name, seed=1)
    model = dgemma.load(path)
    gen = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(3, 128, (2, prompt_len), generator=gen)
    canvas = torch.randint(0, 128, (2, 16), generator=gen)
    sc = 4 * torch.randn(2, 16, 128, generator=gen)
    with torch.no_grad():
        plain = ref(input_ids=prompt, decoder_input_ids=canvas).logits
        conditioned = ref(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
    assert_close(model.canvas_logits(prompt, canvas), plain)
    assert_close(model.canvas_logits(prompt, canvas, self_conditioning_logits=sc), conditioned)
    # Self-conditioning must matter, or the comparison above proves nothing about it.
    assert (plain - conditioned).abs().max() > 1e-3


def test_left_padded_batch_matches_reference(ckpt_dir):
    """Prompts of different lengths are left padded; padding never leaks into the real rows."""
    path, ref = reference_checkpoint(ckpt_dir, "ssfsf", seed=2)
    model = dgemma.load(path)
    gen = torch.Generator().manual_seed(0)
    long, short = torch.randint(3, 128, (23,), generator=gen).tolist(), torch.randint(3, 128, (9,), generator=gen).tolist()
    canvas = torch.randint(0, 128, (2, 16), generator=gen)
    ids = torch.tensor([long, [0] * 14 + short])
    mask = torch.tensor([[1] * 23, [0] * 14 + [1] * 9])
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=canvas,
                         decoder_attention_mask=torch.nn.functional.pad(mask, (0, 16), value=1)).logits
    ours = model.canvas_logits([long, short], canvas)
    assert_close(ours, ref_logits)
    # The short prompt alone gives the same logits as inside the padded batch.
    alone = model.canvas_logits([short], canvas[1:])
    assert torch.allclose(alone[0], ours[1], rtol=1e-4, atol=1e-4 * ours.abs().max().item())


def test_rope_factors_match_reference(ckpt_dir):
    """A rope `factor` divides the proportional (full-attention) frequencies; the default (sliding) rope ignores it, as
    the reference does."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0, "factor": 4.0},
            "full_attention": {"rope_type": "proportional", "rope_theta": 1000.0, "factor": 2.0,
                               "partial_rotary_factor": 0.5}}
    path, ref = reference_checkpoint(ckpt_dir, "ssf", seed=3, rope_parameters=rope)
    model = dgemma.load(path)
    gen = torch.Generator().manual_seed(3)
    prompt, canvas = torch.randint(3, 128, (1, 12), generator=gen), torch.randint(0, 128, (1, 16), generator=gen)
    with torch.no_grad():
        want = ref(input_ids=prompt, decoder_input_ids=canvas).logits
    assert_close(model.canvas_logits(prompt, canvas), want)

