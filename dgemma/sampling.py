"""The entropy-bound sampler for one canvas step, and the stable-and-confident stopping rule.

Owns the reference's exact per-step arithmetic and its order of random draws (multinomial sample, then renoise ids),
from one generator for the whole batch (the reference's way) or from one generator per row (`Generators`: each row
then draws what it would draw alone, whatever else is in the batch), plus pinned positions: held to given ids at
every step, never resampled or renoised, counted as zero entropy so they spend none of the entropy budget, and left
out of the confidence mean.
Must not: run the network or know about caches; it maps logits and canvases to canvases.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


# One generator for the batch (None: the global one), or a list with one per row, where None marks a row that draws
# nothing (a row whose canvas has settled: alone, it would have stopped drawing).
Generators = torch.Generator | list[torch.Generator | None] | None


def random_ids(vocab: int, rows: int, length: int, generator: Generators, device) -> torch.Tensor:
    """Uniform ids [rows, length]: one draw for the batch, or one [length] draw per row from its own generator
    (zeros for a row whose generator is None)."""
    if not isinstance(generator, list):
        return torch.randint(0, vocab, (rows, length), generator=generator, device=device)
    return torch.stack([torch.zeros(length, dtype=torch.long, device=device) if g is None else
                        torch.randint(0, vocab, (length,), generator=g, device=device) for g in generator])


def _multinomial_draws(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """argmax(probs / E) per row of probs [R, V] -> [R], with E ~ Exp(1) made as PyTorch's CPU exponential_ makes it:
    a float64 uniform u per entry, row after row, then -log1p(-u) rounded to probs' dtype."""
    u = torch.empty(probs.shape, dtype=torch.float64, device=probs.device).uniform_(generator=generator)
    draws = torch.log1p(u.neg_()).neg_().to(probs.dtype)
    return torch.div(probs, draws).argmax(-1)


@functools.cache
def _draws_match_multinomial() -> bool:
    """Whether `_multinomial_draws` gives torch.multinomial's indices and leaves its generator where torch.multinomial
    leaves it, on this PyTorch's CPU (checked once, on a small draw)."""
    probs = torch.softmax(torch.linspace(-3.0, 3.0, 2 * 257).view(2, 257), dim=-1)
    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    same = torch.equal(_multinomial_draws(probs, ours), torch.multinomial(probs, 1, generator=theirs).squeeze(-1))
    return same and torch.equal(ours.get_state(), theirs.get_state())


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of probs [R, V] -> [R]: exactly torch.multinomial(probs, 1, generator=generator), the same
    indices and the same generator state after. On the CPU torch.multinomial draws its exponentials one entry at a
    time; `_multinomial_draws` draws the same numbers about twice as fast, so it stands in wherever a check at first
    use finds it equal."""
    if probs.device.type == "cpu" and _draws_match_multinomial():
        return _multinomial_draws(probs, generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def temperature(remaining: int, total: int, t_min: float, t_max: float) -> torch.Tensor:
    """Linear schedule in the number of remaining steps (N..1): t_min + (t_max - t_min) * n / N, as a float32
    scalar tensor computed in the same precision as the reference."""
    step = torch.tensor(remaining, dtype=torch.int32)
    return t_min + (t_max - t_min) * (step / total)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: [..., V] -> [...] (the same arithmetic as a Categorical)."""
    log_p = logits - logits.logsumexp(dim=-1, keepdim=True)
    p = torch.softmax(log_p, dim=-1)
    return -(log_p.clamp(min=torch.finfo(log_p.dtype).min) * p).sum(-1)


def entropy_bound_accept(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Accept the lowest-entropy positions while (cumulative entropy - current entropy) <= bound.
    entropy [B, C] -> accepted mask [B, C] (at least one position per row)."""
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    chosen = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.scatter(torch.zeros_like(chosen), dim=-1, index=order, src=chosen)


# On the CPU a chunk of about this many entries (its float64 draws: 2 MiB) stays in the cache through the chain of
# passes a chunk makes; chunks of 64 rows of a 32k vocabulary ran the `small` sampler step 1.3 to 1.9x slower.
_CPU_CHUNK_ENTRIES = 1 << 18


def sampler_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows `denoise_step` takes at once: cache-sized on the CPU, 64 (few kernel launches) elsewhere."""
    return max(1, _CPU_CHUNK_ENTRIES // vocab) if device.type == "cpu" else 64


@dataclass
class Step:
    temperature: torch.Tensor  # float32 scalar
    logits: torch.Tensor  # [B, C, V] float32, tempered (the next step's self-conditioning input)
    argmax: torch.Tensor  # [B, C] argmax canvas (the draft)
    entropy: torch.Tensor  # [B, C] entropy of the tempered distribution (0 at pinned positions)
    accepted: torch.Tensor  # [B, C] bool
    accepted_canvas: torch.Tensor  # [B, C]
    canvas: torch.Tensor  # [B, C] accepted canvas with the rest renoised: the next step's input


def denoise_step(
    raw_logits: torch.Tensor,
    current: torch.Tensor,
    remaining: int,
    total: int,
    *,
    entropy_bound: float,
    t_min: float,
    t_max: float,
    generator: Generators = None,
    pinned: torch.Tensor | None = None,
    pinned_ids: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> Step:
    """One sampler step. raw_logits [B, C, V] float32 from the decoder (divided by the temperature in place, so the
    decoder's buffer becomes the returned tempered logits); current [B, C] the canvas it read; remaining = n of N.
    pinned [B, C] bool with pinned_ids [B, C] hold positions fixed. Temporaries are at most `chunk_rows` x V
    (default `sampler_chunk_rows`).
    `generator`: one for the batch or a list with one per row (see the module docstring)."""
    temp = temperature(remaining, total, t_min, t_max)
    logits = raw_logits.div_(temp)
    b, c, v = logits.shape
    chunk_rows = chunk_rows or sampler_chunk_rows(v, logits.device)
    flat = logits.view(-1, v)
    sampled = torch.empty(b * c, dtype=torch.long, device=logits.device)
    argmax = torch.empty_like(sampled)
    entropy = torch.empty(b * c, dtype=logits.dtype, device=logits.device)
    # Rows are independent and `sample` draws row after row, so chunking changes no result; with one
    # generator per canvas row, chunks stay within a row.
    if isinstance(generator, list):  # rows without a generator sample nothing: their argmax stands in
        chunks = [(r * c + lo, r * c + min(lo + chunk_rows, c), g) for r, g in enumerate(generator)
                  for lo in range(0, c, chunk_rows)]
    else:
        chunks = [(lo, min(lo + chunk_rows, b * c), generator) for lo in range(0, b * c, chunk_rows)]
    for start, stop, gen in chunks:
        rows = flat[start:stop]
        probs = torch.softmax(rows, dim=-1)
        argmax[start:stop] = rows.argmax(-1)
        if isinstance(generator, list) and gen is None:
            sampled[start:stop] = argmax[start:stop]
        else:
            sampled[start:stop] = sample(probs, gen)
        entropy[start:stop] = token_entropy(rows)
    sampled, argmax, entropy = sampled.view(b, c), argmax.view(b, c), entropy.view(b, c)
    if pinned is not None:
        entropy = entropy.masked_fill(pinned, 0.0)
    accepted = entropy_bound_accept(entropy, entropy_bound)
    accepted_canvas = torch.where(accepted, sampled, current)
    noise = random_ids(v, b, c, generator, current.device)
    canvas = torch.where(~accepted, noise, accepted_canvas)
    if pinned is not None:
        accepted_canvas = torch.where(pinned, pinned_ids, accepted_canvas)
        canvas = torch.where(pinned, pinned_ids, canvas)
        argmax = torch.where(pinned, pinned_ids, argmax)
    return Step(temp, logits, argmax, entropy, accepted, accepted_canvas, canvas)


class StopRule:
    """Stop a row when its argmax canvas has equalled the previous `stability` steps' AND its mean entropy is below
    `confidence` (mean over free positions when some are pinned). Reset per canvas."""

    def __init__(self, stability: int, confidence: float, free: torch.Tensor | None = None):
        self.stability = stability
        self.confidence = confidence
        self.free = free  # [B, C] bool, None = all free
        self.history: torch.Tensor | None = None  # [stability, B, C]

    def __call__(self, argmax: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """argmax [B, C], entropy [B, C] -> stop [B] bool."""
        if self.stability == 0:
            stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        else:
            if self.history is None:
                self.history = torch.full((self.stability, *argmax.shape), -1, dtype=argmax.dtype,
                                          device=argmax.device)
            stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        if self.free is None:
            mean = entropy.mean(dim=-1)
        else:
            mean = (entropy * self.free).sum(-1) / self.free.sum(-1).clamp(min=1)
        return stable & (mean < self.confidence)
