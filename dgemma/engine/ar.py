"""Autoregressive decoding with a DiffusionGemma checkpoint: the causal encoder and the tied head as a plain LM.

Owns: token-by-token decoding through `DiffusionGemma.encode` (the prompt is prefilled in one call, then one token
per call, each call appending its keys/values to a `KVCache`), greedy or temperature sampling, per-row stopping at
the config's EOS ids (or caller-given stop ids), the max_new_tokens cap, and the forward count.
A batch of prompts is left padded (`pad_prompts`) and the padding is masked out through `valid`; a row that has
stopped keeps being fed (as padding) until every row is done, so rows never change each other's tokens.
Must not: touch the decoder, the canvas sampler, tokenizers or files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.diffusion_gemma import DiffusionGemma
from .cache import KVCache
from .generate import pad_prompts, prompt_rows


@dataclass
class ArResult:
    token_ids: list[list[int]]  # new ids per prompt, at most max_new_tokens, the stop id excluded
    forwards: int  # encoder passes run for the batch (the prefill included)


@torch.no_grad()
def ar_generate(net: DiffusionGemma, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
                seed: int | None = None, stop_ids=None) -> ArResult:
    """Decode up to `max_new_tokens` new tokens after each prompt with the causal encoder and the tied head.
    temperature 0 is greedy (argmax); > 0 samples from softmax(logits / temperature) with a generator seeded by
    `seed`. A row ends at the first id in `stop_ids` (default: the config's EOS ids), which is not returned."""
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
    cache = KVCache(cfg, b, device)
    running = torch.ones(b, dtype=torch.bool, device=device)  # [B] rows still decoding
    out: list[list[int]] = [[] for _ in range(b)]
    pending, pending_valid = ids, valid
    forwards = 0
    while True:
        hidden = net.encode(pending, cache, pending_valid)  # [B, T, H]
        forwards += 1
        logits = net.head(hidden[:, -1:])[:, 0]  # [B, V] float32, only the last position
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]  # [B]
        else:
            token = logits.argmax(dim=-1)  # [B]
        stopped = torch.isin(token, stop) & running
        running = running & ~stopped
        for row in running.nonzero()[:, 0].tolist():
            out[row].append(int(token[row]))
        # Every running row has gained one token per pass, so they all hold `forwards` tokens.
        if forwards == max_new_tokens or not bool(running.any()):
            break
        # Rows that have stopped go on as padding so the running rows keep their batch.
        pending = torch.where(running, token, torch.full_like(token, cfg.pad_token_id))[:, None]  # [B, 1]
        pending_valid = running[:, None]  # [B, 1]
    return ArResult(out, forwards)
