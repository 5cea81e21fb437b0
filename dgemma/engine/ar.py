"""Autoregressive decoding with a DiffusionGemma checkpoint: the causal encoder and the tied head as a plain LM.

Owns: token-by-token decoding through `DiffusionGemma.encode` into a `StaticKVCache` sized for the prompt and the
new tokens (the prompt is prefilled in one call, then one token per call), greedy or temperature sampling, per-row
stopping at the config's EOS ids (or caller-given stop ids), the max_new_tokens cap, and the forward count; and
scoring given continuations of a prompt by their log-probability (`ar_score`, `fit_scores`). On a CUDA device the
one-token pass is captured once as a CUDA graph and replayed for every token (`graphs.use_graphs`): the honest
baseline for diffusion's speed, since an eager token step is bound by kernel launches, not by the weights it reads.
A capture that fails leaves a warning and eager passes.
A batch of prompts is left padded (`pad_prompts`) and the padding is masked out through `valid`; a row that has
stopped keeps being fed (as padding) until every row is done, so rows never change each other's tokens.
Must not: touch the decoder, the canvas sampler, tokenizers or files.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..model.diffusion_gemma import DiffusionGemma
from ..sampling import sample
from . import graphs
from .cache import StaticKVCache
from .generate import bad_token_id, pad_prompts, prompt_rows


@dataclass
class ArResult:
    token_ids: list[list[int]]  # new ids per prompt, at most max_new_tokens, the stop id excluded
    forwards: int  # encoder passes run for the batch (the prefill included)


class TokenStep:
    """`step(token [B], valid [B]) -> logits [B, V]`: one encoder pass over one new token per row, appended to a
    StaticKVCache, then the tied head at that position. Replayed from a CUDA graph where `graphs.use_graphs` says so
    (the capture's own eager warm-up pass is the first call's result); the returned logits are then the graph's
    output buffer, which the next call overwrites."""

    capture = staticmethod(graphs.capture_cuda_graph)  # (fn, device) -> (replay, output, first result)

    def __init__(self, net: DiffusionGemma, cache: StaticKVCache):
        self.net, self.cache = net, cache
        b = cache.valid.shape[0]
        self.token = torch.zeros(b, 1, dtype=torch.long, device=net.device)  # [B, 1] static input
        self.valid = torch.ones(b, 1, dtype=torch.bool, device=net.device)  # [B, 1]
        self.graphs = graphs.use_graphs(net.device)
        self._replay = self._out = None

    def _pass(self) -> torch.Tensor:
        hidden = self.net.encode(self.token, self.cache, self.valid)  # [B, 1, H]
        return self.net.head(hidden)[:, 0]  # [B, V] float32

    def __call__(self, token: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token[:, None])
        self.valid.copy_(valid[:, None])
        if not self.graphs:
            return self._pass()
        if self._replay is None:
            try:
                self._replay, self._out, first = self.capture(self._pass, self.net.device)
            except Exception as err:  # any capture failure: keep decoding, eagerly
                self.graphs = False
                warnings.warn(f"CUDA graph capture of the token step failed ({type(err).__name__}: {err}); "
                              "decoding eagerly", RuntimeWarning, stacklevel=2)
                return self._pass()
            return first
        self._replay()
        return self._out


@torch.no_grad()
def ar_generate(net: DiffusionGemma, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
                seed: int | None = None, stop_ids=None, on_token: Callable[[], None] | None = None) -> ArResult:
    """Decode up to `max_new_tokens` new tokens after each prompt with the causal encoder and the tied head.
    temperature 0 is greedy (argmax); > 0 samples from softmax(logits / temperature) with a generator seeded by
    `seed`. A row ends at the first id in `stop_ids` (default: the config's EOS ids), which is not returned.
    `on_token()` is called once per pass, when its tokens have reached the host (so the pass has finished)."""
    cfg = net.config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    rows = prompt_rows(prompt_ids, cfg.vocab_size)
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the context of "
                         f"{cfg.max_position_embeddings} positions")
    device = net.device
    stop = torch.tensor(sorted(set(cfg.eos_token_ids if stop_ids is None else stop_ids)), dtype=torch.long,
                        device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))

    ids, valid = pad_prompts(rows, cfg.pad_token_id, device)  # [B, T] each
    b = ids.shape[0]
    cache = StaticKVCache(cfg, b, ids.shape[1] + max_new_tokens, net.dtype, device)
    step = TokenStep(net, cache)
    logits = net.head(net.encode(ids, cache, valid)[:, -1])  # [B, V] float32: the prefill pass
    running = torch.ones(b, dtype=torch.bool, device=device)  # [B] rows still decoding
    out: list[list[int]] = [[] for _ in range(b)]
    forwards = 1
    while True:
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = sample(probs, generator)  # [B]
        else:
            token = logits.argmax(dim=-1)  # [B]
        running = running & ~torch.isin(token, stop)
        tokens, live = torch.stack([token, running.long()]).tolist()  # the token's one host sync
        if on_token is not None:
            on_token()
        for row in range(b):
            if live[row]:
                out[row].append(tokens[row])
        # Every running row has gained one token per pass, so they all hold `forwards` tokens.
        if forwards == max_new_tokens or not any(live):
            break
        # Rows that have stopped go on as padding so the running rows keep their batch.
        logits = step(torch.where(running, token, torch.full_like(token, cfg.pad_token_id)), running)
        forwards += 1
    return ArResult(out, forwards)


# Logits `ar_score` holds at once (64 MiB in float32): a few positions of a large vocabulary, not all of them.
_SCORE_ENTRIES = 1 << 24


@torch.no_grad()
def ar_score(net: DiffusionGemma, prompt_ids: list[int], continuations: list[list[int]]) -> torch.Tensor:
    """The log-probability the causal encoder and the tied head give each continuation after one prompt: the sum of
    log p(token | everything before it) over the continuation's tokens -> float32 [N] (0 for an empty one). One
    encoder pass over the prompt and every continuation, right-padded: padding comes after a row's tokens, so a
    causal pass never reads it. The head runs a few positions at a time (`_SCORE_ENTRIES` logits)."""
    cfg = net.config
    prompt = prompt_rows([list(prompt_ids)], cfg.vocab_size)[0]
    if not continuations:
        raise ValueError("ar_score needs at least one continuation")
    rows = [list(c) for c in continuations]
    bad = bad_token_id([t for r in rows for t in r], cfg.vocab_size)
    if bad is not None:
        raise ValueError(f"continuation token id {bad!r} is outside the vocabulary [0, {cfg.vocab_size})")
    longest = max(len(r) for r in rows)
    if longest == 0:
        return torch.zeros(len(rows), device=net.device)
    if len(prompt) + longest > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {len(prompt)} tokens plus a continuation of {longest} exceeds the context of "
                         f"{cfg.max_position_embeddings} positions")
    device = net.device
    ids = torch.tensor([prompt + r + [cfg.pad_token_id] * (longest - len(r)) for r in rows], device=device)  # [N, T]
    real = torch.tensor([[True] * len(r) + [False] * (longest - len(r)) for r in rows], device=device)  # [N, L]
    cache = StaticKVCache(cfg, len(rows), ids.shape[1], net.dtype, device)
    hidden = net.encode(ids, cache)[:, len(prompt) - 1:-1].flatten(0, 1)  # [N * L, H]: each predicts the next token
    targets = ids[:, len(prompt):].flatten()  # [N * L]
    picked = torch.empty(targets.shape, device=device)  # [N * L] float32
    step = max(1, _SCORE_ENTRIES // cfg.vocab_size)
    for start in range(0, len(targets), step):
        logits = net.head(hidden[start:start + step])  # [step, V] float32
        picked[start:start + step] = logits.gather(-1, targets[start:start + step, None])[:, 0] - logits.logsumexp(-1)
    return torch.where(real, picked.view(real.shape), 0.0).sum(-1)


def fit_scores(net: DiffusionGemma, prompt_ids: list[int], texts: list[list[int]]) -> torch.Tensor:
    """`ar_score` of each candidate text after the prompt, for choosing among them: an empty text, which leaves
    nothing to score, ranks last (-inf) instead of first (log 1 = 0) -> float32 [N]."""
    scores = ar_score(net, prompt_ids, texts)
    return scores.masked_fill(torch.tensor([not t for t in texts], device=scores.device), float("-inf"))
