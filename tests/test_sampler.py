"""One sampler step equals the reference's: temperature, sample, accept, renoise, stop decision."""

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgemma import sampling
from dgemma.sampling import StopRule, denoise_step, entropy_bound_accept, sample, token_entropy

B, C, V, N = 3, 16, 50, 12


def reference_step(raw, current, remaining, bound, stop):
    """The reference's per-step sampler arithmetic, in its order of draws, on the global generator."""
    processed = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, N)(None, raw, torch.tensor(remaining,
                                                                                              dtype=torch.int32))
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs.view(-1, V), num_samples=1).view(B, C)
    argmax = processed.argmax(-1)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), C, V, N)
    accepted_canvas = sampler.accept_canvas(current, sampled, processed, remaining)
    renoised = sampler.renoise_canvas(accepted_canvas, remaining)
    return processed, argmax, sampler.accepted_token_mask, accepted_canvas, renoised, stop(argmax, processed)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bound", [0.1, 2.0])
def test_step_matches_reference(seed, bound):
    gen = torch.Generator().manual_seed(100 + seed)
    scale = torch.tensor([0.5, 5.0, 40.0])[:, None, None]  # flat, medium and peaked rows
    raw = torch.randn(B, C, V, generator=gen) * scale
    current = torch.randint(0, V, (B, C), generator=gen)
    remaining = [N, 7, 1][seed % 3]
    ref_stop = StableAndConfidentStoppingCriteria(stability_threshold=1, confidence_threshold=0.5)
    ours_stop = StopRule(1, 0.5)
    # Two consecutive steps so that the stability history is exercised.
    for _ in range(2):
        torch.manual_seed(seed)
        expected = reference_step(raw, current, remaining, bound, ref_stop)
        step = denoise_step(raw.clone(), current, remaining, N, entropy_bound=bound, t_min=0.4, t_max=0.8,
                            generator=torch.Generator().manual_seed(seed))
        stop = ours_stop(step.argmax, step.entropy)
        processed, argmax, accepted, accepted_canvas, renoised, ref_stop_decision = expected
        inverse = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, N)(None, torch.ones(()), torch.tensor(remaining))
        assert torch.allclose(step.temperature, 1 / inverse)
        assert torch.equal(step.logits, processed)
        assert torch.equal(step.argmax, argmax)
        assert torch.equal(step.accepted, accepted)
        assert torch.equal(step.accepted_canvas, accepted_canvas)
        assert torch.equal(step.canvas, renoised)
        assert torch.equal(stop, ref_stop_decision)
    # The peaked row settles (stable on the second identical step, confident); the flat one does not.
    assert not stop[0] and stop[2]


def test_entropy_matches_categorical():
    logits = torch.randn(4, 9, 30) * 7
    assert torch.equal(token_entropy(logits), torch.distributions.Categorical(logits=logits).entropy())


def test_accept_takes_at_least_one_and_respects_bound():
    entropy = torch.tensor([[0.5, 0.01, 0.3, 0.02], [3.0, 2.0, 4.0, 5.0]])
    accepted = entropy_bound_accept(entropy, 0.1)
    # Row 0: sorted 0.01, 0.02, 0.3 -> 0.01 + 0.02 <= 0.1 admits the third (0.3); the fourth would need 0.33.
    assert accepted.tolist() == [[False, True, True, True], [False, True, False, False]]


def test_pinned_positions_are_held_and_free():
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(1, C, V, generator=gen)
    current = torch.randint(0, V, (1, C), generator=gen)
    pinned = torch.zeros(1, C, dtype=torch.bool)
    pinned[0, 4:9] = True
    ids = torch.full((1, C), 7)
    step = denoise_step(raw, current, 3, N, entropy_bound=0.1, t_min=0.4, t_max=0.8, generator=gen,
                        pinned=pinned, pinned_ids=ids)
    assert (step.canvas[pinned] == 7).all() and (step.argmax[pinned] == 7).all()
    assert (step.entropy[pinned] == 0).all() and step.accepted[pinned].all()
    # Free positions still accept at least one token of their own.
    assert step.accepted[~pinned].any()


@pytest.mark.parametrize("vocab, scale", [(1, 1.0), (7, 0.1), (2048, 3.0), (32768, 8.0)])
def test_sample_is_torch_multinomial_draw_for_draw(vocab, scale):
    """Same indices and the same generator state after, so every later draw (renoise ids, the next step) agrees too;
    rows include zero probabilities (masked logits), and the global generator is used alike."""
    assert sampling._draws_match_multinomial()  # the fast path is the one under test on this PyTorch
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(37, vocab, generator=gen) * scale
    logits[::3, : vocab // 2] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    for seed in range(3):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(sample(probs, ours), torch.multinomial(probs, 1, generator=theirs).squeeze(-1))
        assert torch.equal(ours.get_state(), theirs.get_state())
    torch.manual_seed(5)
    ours = sample(probs, None)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(ours, torch.multinomial(probs, 1).squeeze(-1)) and torch.equal(after, torch.rand(3))
