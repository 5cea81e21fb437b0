"""Block-autoregressive generation: encode the prompt, denoise a canvas, commit it through the encoder, repeat.

Owns the canvas loop (`CanvasLoop`) and its bookkeeping: left padding of a batch of prompts, reuse of a stored prompt
prefix, per-row stopping (a row whose canvas settled is frozen while the others go on), EOS handling (tokens after
the first EOS become pad and the row ends), each row's max_new_tokens cut (never more tokens returned than asked),
tokens per forward, steps per canvas, the per-step callback, and a starting canvas (-1 = noise) with pinned positions.
Each canvas's decoder passes go through `CanvasDecoder` (CUDA graphs on a GPU). Random numbers are drawn in the
reference's order: per canvas one uniform canvas, then per step a multinomial sample and the renoise ids. A step
waits for the device once, for the stop check.
Continuous batching: with one generator per row, rows join a running loop at any canvas boundary (their prompts are
encoded then, and their caches joined to the batch's, each row keeping its own positions) and finished rows leave
it (`release`), so a row's tokens do not depend on what else runs beside it beyond float rounding. With one
generator for the batch (`generate`, the reference's draws), rows join only before the first canvas and stay to the
end.
Must not: know tensor layouts inside the network, tokenizers or files.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import GenerationSettings
from ..model.diffusion_gemma import DiffusionGemma
from ..sampling import Generators, StopRule, denoise_step, random_ids
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


def bad_token_id(ids: list, vocab: int):
    """The first entry of `ids` that is not an id in [0, vocab) (None when all are)."""
    return next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)


def plain_ids(ids):
    """Arrays (numpy, tensors) as lists and integer scalars of any kind (numpy's too) as ints, at any depth; anything
    else as it is, for the checks to name."""
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        ids = ids.tolist()  # a 0-d array gives its scalar
    if isinstance(ids, (list, tuple)):
        if all(type(x) is int for x in ids):  # the usual case, without a call per id
            return list(ids)
        return [plain_ids(x) for x in ids]
    return operator.index(ids) if isinstance(ids, numbers.Integral) and not isinstance(ids, bool) else ids


def prompt_rows(prompt_ids, vocab: int) -> list[list[int]]:
    """A 2-D tensor, a list of id lists or one id list -> validated id lists (errors name the problem)."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() not in (1, 2) or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids tensor must hold integer ids, got shape {tuple(prompt_ids.shape)} "
                             f"dtype {prompt_ids.dtype}")
        prompt_ids = prompt_ids.tolist()
    prompt_ids = plain_ids(prompt_ids)
    if not isinstance(prompt_ids, (list, tuple)):
        raise ValueError("prompt_ids must be a list of id lists or a 2-D tensor")
    if not prompt_ids:
        raise ValueError("empty prompt: prompt_ids holds no prompts")
    rows = [list(prompt_ids)] if isinstance(prompt_ids[0], int) else [list(p) for p in prompt_ids]
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"empty prompt: prompt {i} has no tokens")
        bad = bad_token_id(row, vocab)
        if bad is not None:
            raise ValueError(f"prompt {i}: token id {bad!r} is outside the vocabulary [0, {vocab})")
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


@dataclass
class Row:
    """One prompt's state in a `CanvasLoop`."""

    prompt: list[int]
    max_new_tokens: int
    generator: torch.Generator | None = None  # its own draws, in a loop with per-row generators
    tag: object = None  # the caller's handle
    token_ids: list[int] = field(default_factory=list)  # new ids so far: no pad, nothing from the first EOS on
    produced: int = 0  # generated non-pad ids within max_new_tokens, an EOS included
    written: int = 0  # canvas slots committed so far
    passes: int = 0  # decoder passes spent on this row
    steps: list[int] = field(default_factory=list)  # decoder passes per canvas
    finish_reason: str | None = None  # "stop" (EOS) or "length" once the row has ended

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CanvasCommit:
    """What one canvas gave one row."""

    row: Row
    token_ids: list[int]  # the ids this canvas added to row.token_ids
    steps: int  # decoder passes this canvas took for the row
    draft: list[int]  # the canvas's final argmax draft, all C ids (pinned ones included)


class CanvasLoop:
    """Rows that denoise one canvas at a time together. `add` queues prompts; `step` encodes what is pending (the
    last canvas's commits, the prompts of rows that join), denoises and commits one canvas for every row, and returns
    a CanvasCommit per row that was still going; `release` drops finished rows. `generator`: one torch.Generator (or
    None) shared by the batch, or `per_row=True` for each row's own (`add(..., generators=)`), which lets rows join
    at any canvas boundary. `on_step` gets a StepEvent after every step; its rows are `rows`, in order."""

    def __init__(self, net: DiffusionGemma, settings: GenerationSettings, *, generator: torch.Generator | None = None,
                 per_row: bool = False, on_step: Callable[[StepEvent], None] | None = None,
                 prefix_cache: PrefixCache | None = None):
        self.net, self.settings, self.on_step, self.prefix_cache = net, settings, on_step, prefix_cache
        self.generator, self.per_row = generator, per_row
        self.rows: list[Row] = []
        self.canvases = 0  # canvases denoised so far
        self._joining: list[Row] = []
        self._cache: KVCache | None = None  # the rows' encoder cache
        self._pending: torch.Tensor | None = None  # [B, C] committed canvases not yet encoded

    def add(self, prompts: list[list[int]], max_new_tokens: int, *, generators: list | None = None,
            tags: list | None = None) -> list[Row]:
        """Queue prompts (validated id lists) to join at the next canvas; returns their rows."""
        if not self.per_row and self.canvases:
            raise ValueError("rows join a running batch only when each row has its own generator (per_row=True)")
        if self.per_row and (generators is None or len(generators) != len(prompts)
                             or not all(isinstance(g, torch.Generator) for g in generators)):
            raise ValueError("a loop with per-row generators needs one torch.Generator per prompt")
        rows = [Row(list(p), max_new_tokens, None if generators is None else generators[i],
                    None if tags is None else tags[i]) for i, p in enumerate(prompts)]
        self._joining.extend(rows)
        return rows

    def release(self, rows: list[Row] | None = None) -> list[Row]:
        """Drop `rows` (default: the finished ones) and their cache rows from the batch, or from the rows waiting to
        join; returns those dropped."""
        leaving = {id(r) for r in rows} if rows is not None else {id(r) for r in self.rows if r.finished}
        waiting = [r for r in self._joining if id(r) in leaving]
        self._joining = [r for r in self._joining if id(r) not in leaving]
        gone = [r for r in self.rows if id(r) in leaving]
        if gone:
            keep = [i for i, r in enumerate(self.rows) if id(r) not in leaving]
            self.rows = [self.rows[i] for i in keep]
            if keep:
                index = torch.tensor(keep, device=self.net.device)
                self._cache = self._cache.select(index)
                self._pending = None if self._pending is None else self._pending[index]
            else:
                self._cache, self._pending = None, None
        return waiting + gone

    def _admit(self) -> None:
        """Encode the joining rows' prompts (one left-padded batch) and join their cache to the batch's."""
        rows, self._joining = self._joining, []
        device = self.net.device
        ids, valid = pad_prompts([r.prompt for r in rows], self.net.config.pad_token_id, device)
        cache = KVCache(self.net.config, len(rows), device)
        if self.per_row and len(rows) > 1:  # each row's positions start at 0 past its padding, as when it joins alone
            cache.offset = -(~valid).sum(dim=1)
        prompt = rows[0].prompt if self.prefix_cache is not None and len(rows) == 1 else None
        if prompt is not None and (hit := self.prefix_cache.match(prompt)) is not None:
            cache, reused = hit
            ids, valid = ids[:, reused:], valid[:, reused:]
        self.net.encode(ids, cache, valid)
        if prompt is not None:
            self.prefix_cache.store(prompt, cache)
        self._cache = cache if self._cache is None else KVCache.concat(self._cache, cache)
        self.rows.extend(rows)

    @torch.no_grad()
    def step(self, canvas: torch.Tensor | None = None, pinned: torch.Tensor | None = None) -> list[CanvasCommit]:
        """Denoise and commit one canvas for every row; canvas/pinned [B, C] (rows in `rows` order after the
        joining ones) start this canvas from given ids and hold pinned ones."""
        net, settings, cfg = self.net, self.settings, self.net.config
        if self._pending is not None:
            net.encode(self._pending, self._cache, torch.ones_like(self._pending, dtype=torch.bool))
            self._pending = None
        if self._joining:
            self._admit()
        if not self.rows:
            raise ValueError("no rows to generate: add prompts first")
        b, c, v = len(self.rows), cfg.canvas_length, cfg.vocab_size
        device = net.device
        # Per-row generators: a row that has finished, or whose canvas settled, draws nothing more (alone, it would
        # not be sampled any more), so its next draws are the ones it would make alone.
        generator: Generators = [None if r.finished else r.generator for r in self.rows] if self.per_row \
            else self.generator
        n_steps = settings.max_denoising_steps
        finished = torch.tensor([r.finished for r in self.rows], device=device)
        decoder = CanvasDecoder(net, self._cache)  # the cache stays as it is until this canvas is committed
        current = random_ids(v, b, c, generator, device)
        if canvas is not None:
            current = torch.where(canvas >= 0, canvas, current)
        stop_rule = StopRule(settings.stability_threshold, settings.confidence_threshold,
                             None if pinned is None else ~pinned)
        argmax = current
        done = torch.zeros(b, dtype=torch.bool, device=device)
        canvas_passes = torch.zeros(b, dtype=torch.long, device=device)
        sc_logits = None
        any_done = False  # host copy of done.any(), read with the stop check so a step syncs only once
        try:
            for step_number, remaining in enumerate(range(n_steps, 0, -1), start=1):
                canvas_passes += ~(done | finished)
                logits = decoder(current, sc_logits)
                step = denoise_step(
                    logits, current, remaining, n_steps, entropy_bound=settings.entropy_bound, t_min=settings.t_min,
                    t_max=settings.t_max, generator=generator, pinned=pinned, pinned_ids=canvas if pinned is not None
                    else None,
                )
                new_argmax, new_current, new_logits = step.argmax, step.canvas, step.logits
                if any_done:  # settled rows keep their canvas, draft and logits
                    new_argmax = torch.where(done[:, None], argmax, new_argmax)
                    new_current = torch.where(done[:, None], current, new_current)
                    new_logits = torch.where(done[:, None, None], sc_logits, new_logits)
                done = done | stop_rule(new_argmax, step.entropy)
                current, argmax = new_current, new_argmax
                sc_logits = new_logits.to(net.dtype)
                if self.on_step is not None:
                    self.on_step(StepEvent(self.canvases, step_number, argmax, step.accepted, done))
                done_rows = done.tolist()  # the step's one host sync
                if all(done_rows):
                    break
                any_done = any(done_rows)
                if self.per_row and any_done:
                    generator = [None if d else g for g, d in zip(generator, done_rows)]
        finally:
            decoder.close()  # the graphs may serve another canvas now
        self.canvases += 1
        committed = argmax.clone()
        committed[finished] = cfg.pad_token_id
        is_eos = torch.isin(committed, torch.tensor(cfg.eos_token_ids, dtype=torch.long, device=device))
        seen = is_eos.cumsum(dim=-1)
        committed[(seen > 0) & ~((seen == 1) & is_eos)] = cfg.pad_token_id  # after the first EOS
        self._pending = committed
        return [self._commit(row, ids, draft, int(n), eos)
                for row, ids, draft, n, eos in zip(self.rows, committed.tolist(), argmax.tolist(),
                                                   canvas_passes.tolist(), is_eos.any(dim=-1).tolist())
                if not row.finished]

    def _commit(self, row: Row, ids: list[int], draft: list[int], passes: int, eos_anywhere: bool) -> CanvasCommit:
        """Add one committed canvas (pad after its first EOS) to a row, cut at the row's max_new_tokens."""
        c = len(ids)
        row.passes += passes
        row.steps.append(passes)
        eos_ids, pad = set(self.net.config.eos_token_ids), self.net.config.pad_token_id
        room = ids[: max(0, row.max_new_tokens - row.written)]
        row.written += c
        row.produced += sum(1 for t in room if t != pad)
        cut = next((i for i, t in enumerate(room) if t in eos_ids), None)
        kept = [t for t in (room if cut is None else room[:cut]) if t != pad]
        row.token_ids.extend(kept)
        if cut is not None:
            row.finish_reason = "stop"
        elif eos_anywhere or row.written >= row.max_new_tokens:
            row.finish_reason = "length"
        return CanvasCommit(row, kept, passes, draft)


@torch.no_grad()
def generate(
    net: DiffusionGemma,
    prompts: list[list[int]],
    settings: GenerationSettings,
    *,
    generator: torch.Generator | None = None,
    canvas: torch.Tensor | None = None,
    pinned: torch.Tensor | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    prefix_cache: PrefixCache | None = None,
) -> GenerationResult:
    """Validated prompt id lists, left padded into one batch; canvas/pinned [B, C] or None (first canvas only). See
    the module docstring. With `prefix_cache`, a one-row prompt that extends a stored prompt encodes only its new
    tokens, and the prompt's cache is stored."""
    loop = CanvasLoop(net, settings, generator=generator, on_step=on_step, prefix_cache=prefix_cache)
    rows = loop.add(prompts, settings.max_new_tokens)
    loop.step(canvas, pinned)
    while not all(r.finished for r in rows):
        loop.step()
    return GenerationResult([r.token_ids for r in rows], [r.produced / max(r.passes, 1) for r in rows],
                            [r.steps for r in rows], [r.finish_reason for r in rows])
