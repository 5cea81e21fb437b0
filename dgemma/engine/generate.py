"""Block-autoregressive generation: encode the prompt, denoise a canvas, commit it through the encoder, repeat.

Owns the canvas loop and its bookkeeping: left padding of a batch of prompts, reuse of a stored prompt prefix,
per-row stopping (a row whose canvas settled is frozen while the others go on), EOS handling (tokens after the first
EOS become pad and the row ends), the max_new_tokens cut (never more tokens returned than asked), tokens per forward,
steps per canvas, the per-step callback, and a starting canvas (-1 = noise) with pinned positions (first canvas
only). Each canvas's decoder passes go through `CanvasDecoder` (CUDA graphs on a GPU). Random numbers are drawn in the
reference's order: per canvas one uniform canvas, then per step a multinomial sample and the renoise ids. A step
waits for the device once, for the stop check.
Must not: know tensor layouts inside the network, tokenizers or files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import GenerationSettings
from ..model.diffusion_gemma import DiffusionGemma
from ..sampling import StopRule, denoise_step
from .cache import KVCache
from .graphs import CanvasDecoder
from .prefix import PrefixCache


@dataclass
class StepEvent:
    """What `on_step` receives after every denoising step."""

    canvas_index: int  # 0-based canvas number
    step: int  # 1-based step within this canvas
    draft: torch.Tensor  # [B, C] argmax canvas
    accepted: torch.Tensor  # [B, C] bool, positions accepted this step
    done: torch.Tensor  # [B] bool, rows whose canvas has settled


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # new ids per prompt: no pad, nothing from the first EOS on
    tokens_per_forward: list[float]  # per prompt: generated non-pad tokens / decoder passes
    steps: list[list[int]]  # per prompt: decoder passes spent on each canvas it took part in
    finish_reasons: list[str] = field(default_factory=list)  # "stop" (EOS) or "length"


def prompt_rows(prompt_ids, vocab: int) -> list[list[int]]:
    """A 2-D tensor, a list of id lists or one id list -> validated id lists (errors name the problem)."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() not in (1, 2) or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids tensor must hold integer ids, got shape {tuple(prompt_ids.shape)} "
                             f"dtype {prompt_ids.dtype}")
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, (list, tuple)):
        raise ValueError("prompt_ids must be a list of id lists or a 2-D tensor")
    if not prompt_ids:
        raise ValueError("empty prompt: prompt_ids holds no prompts")
    rows = [list(prompt_ids)] if isinstance(prompt_ids[0], int) else [list(p) for p in prompt_ids]
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"empty prompt: prompt {i} has no tokens")
        for t in row:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt {i}: token id {t!r} is outside the vocabulary [0, {vocab})")
    return rows


def pad_prompts(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ids [B, T] and valid [B, T] (False on padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[row, width - len(p):] = True
    return ids.to(device), valid.to(device)


@torch.no_grad()
def generate(
    net: DiffusionGemma,
    ids: torch.Tensor,
    valid: torch.Tensor,
    settings: GenerationSettings,
    *,
    generator: torch.Generator | None = None,
    canvas: torch.Tensor | None = None,
    pinned: torch.Tensor | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    prefix_cache: PrefixCache | None = None,
) -> GenerationResult:
    """ids/valid [B, T] (left padded); canvas/pinned [B, C] or None. See the module docstring. With `prefix_cache`,
    a one-row prompt that extends a stored prompt encodes only its new tokens, and the prompt's cache is stored."""
    cfg = net.config
    b, c, v = ids.shape[0], cfg.canvas_length, cfg.vocab_size
    device = ids.device
    eos = torch.tensor(cfg.eos_token_ids, dtype=torch.long, device=device)
    n_steps = settings.max_denoising_steps
    cache = KVCache(cfg, b, device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    passes = torch.zeros(b, dtype=torch.long, device=device)
    steps: list[list[int]] = [[] for _ in range(b)]
    canvases: list[torch.Tensor] = []
    pending, pending_valid = ids, valid
    prompt = ids[0].tolist() if prefix_cache is not None and b == 1 else None
    if prompt is not None and (hit := prefix_cache.match(prompt)) is not None:
        cache, reused = hit
        pending, pending_valid = ids[:, reused:], valid[:, reused:]
    for index in range(math.ceil(settings.max_new_tokens / c)):
        net.encode(pending, cache, pending_valid)
        if index == 0 and prompt is not None:
            prefix_cache.store(prompt, cache)
        decoder = CanvasDecoder(net, cache)  # the cache stays as it is until this canvas is committed
        current = torch.randint(0, v, (b, c), generator=generator, device=device)
        hold = pinned if index == 0 else None
        if index == 0 and canvas is not None:
            current = torch.where(canvas >= 0, canvas, current)
        stop_rule = StopRule(settings.stability_threshold, settings.confidence_threshold,
                             None if hold is None else ~hold)
        argmax = current
        done = torch.zeros(b, dtype=torch.bool, device=device)
        active = ~finished
        canvas_passes = torch.zeros(b, dtype=torch.long, device=device)
        sc_logits = None
        any_done = False  # host copy of done.any(), read with the stop check so a step syncs only once
        for step_number, remaining in enumerate(range(n_steps, 0, -1), start=1):
            canvas_passes += ~(done | finished)
            logits = decoder(current, sc_logits)
            step = denoise_step(
                logits, current, remaining, n_steps, entropy_bound=settings.entropy_bound, t_min=settings.t_min,
                t_max=settings.t_max, generator=generator, pinned=hold, pinned_ids=canvas if hold is not None else None,
            )
            new_argmax, new_current, new_logits = step.argmax, step.canvas, step.logits
            if any_done:  # settled rows keep their canvas, draft and logits
                new_argmax = torch.where(done[:, None], argmax, new_argmax)
                new_current = torch.where(done[:, None], current, new_current)
                new_logits = torch.where(done[:, None, None], sc_logits, new_logits)
            done = done | stop_rule(new_argmax, step.entropy)
            current, argmax = new_current, new_argmax
            sc_logits = new_logits.to(net.dtype)
            if on_step is not None:
                on_step(StepEvent(index, step_number, argmax, step.accepted, done))
            all_done, any_done = torch.stack([done.all(), done.any()]).tolist()  # the step's one host sync
            if all_done:
                break
        passes += canvas_passes
        for row in range(b):
            if bool(active[row]):
                steps[row].append(int(canvas_passes[row]))
        committed = argmax.clone()
        committed[finished] = cfg.pad_token_id
        is_eos = torch.isin(committed, eos)
        seen = is_eos.cumsum(dim=-1)
        committed[(seen > 0) & ~((seen == 1) & is_eos)] = cfg.pad_token_id  # after the first EOS
        finished = finished | is_eos.any(dim=-1)
        canvases.append(committed)
        if bool(finished.all()):
            break
        pending, pending_valid = committed, torch.ones_like(committed, dtype=torch.bool)

    generated = torch.cat(canvases, dim=1)[:, : settings.max_new_tokens].tolist()
    eos_set, pad = set(cfg.eos_token_ids), cfg.pad_token_id
    token_ids, reasons, per_forward = [], [], []
    for row, seq in enumerate(generated):
        cut = next((i for i, t in enumerate(seq) if t in eos_set), None)
        kept = seq if cut is None else seq[:cut]
        token_ids.append([t for t in kept if t != pad])
        reasons.append("length" if cut is None else "stop")
        produced = sum(1 for t in seq if t != pad)
        per_forward.append(produced / max(int(passes[row]), 1))
    return GenerationResult(token_ids, per_forward, steps, reasons)
