"""The public model handle returned by `dgemma.load`.

Owns: input validation (prompts, canvases, pinned masks, settings) with errors that name the problem, the
conversion of user inputs into padded tensors, per-call settings over the checkpoint's defaults, seeding, and the
text helpers (`complete`, `chat`, `infill`) when the checkpoint has a tokenizer.
Must not: hold network math (model/), the sampler (sampling.py) or the canvas loop (engine/generate.py).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint, quant
from .config import GenerationSettings, ModelConfig
from .engine.ar import fit_scores
from .engine.cache import KVCache
from .engine.generate import (GenerationResult, StepEvent, bad_token_id, generate, pad_prompts, plain_ids,
                              prompt_rows)
from .engine.prefix import PrefixCache
from .model.diffusion_gemma import DiffusionGemma
from .tokenizer import Tokenizer

BUNDLED = Path(__file__).parent / "assets" / "model"  # the small model shipped in the package

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[value]


@dataclass
class TextResult:
    text: list[str]  # per row: the answer
    result: GenerationResult
    reasoning: list[str] | None = None  # per row: the thought channel's text (chat with a channel-marking vocabulary)


class Model:
    """A loaded DiffusionGemma: `generate` on ids, `canvas_logits` for one decoder pass, text helpers."""

    def __init__(self, net: DiffusionGemma, settings: GenerationSettings | None = None,
                 tokenizer: Tokenizer | None = None, path: Path | None = None):
        self.net = net
        self.config: ModelConfig = net.config
        self.settings = settings or GenerationSettings()
        self.tokenizer = tokenizer
        self.path = path

    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    # ---- inputs ------------------------------------------------------------------------------------------------
    def prompt_rows(self, prompt_ids) -> list[list[int]]:
        """A 2-D tensor, a list of id lists or one id list -> validated id lists that leave room for a canvas."""
        rows = prompt_rows(prompt_ids, self.config.vocab_size)
        longest = max(len(r) for r in rows)
        if longest + self.config.canvas_length > self.config.max_position_embeddings:
            raise ValueError(f"prompt of {longest} tokens plus a canvas exceeds the context of "
                             f"{self.config.max_position_embeddings} positions")
        return rows

    def _prompts(self, prompt_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """A 2-D tensor or a list of id lists -> left-padded ids [B, T] and valid [B, T], validated."""
        return pad_prompts(self.prompt_rows(prompt_ids), self.config.pad_token_id, self.device)

    def canvas_ids(self, canvas, batch: int, name: str, dtype=torch.long) -> torch.Tensor:
        """A canvas-shaped input ([C] or [B, C]) -> [B, C] on the model's device."""
        c = self.config.canvas_length
        t = torch.as_tensor(canvas, device=self.device)
        if t.dim() == 1:
            t = t[None].expand(batch, -1)
        if t.dim() != 2 or t.shape[1] != c or t.shape[0] != batch:
            raise ValueError(f"{name} must have length {c} (the canvas length) for each of {batch} prompts, "
                             f"got shape {tuple(t.shape)}")
        if dtype == torch.long:
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"{name} must hold integer token ids")
            if bool(((t < -1) | (t >= self.config.vocab_size)).any()):
                raise ValueError(f"{name} holds ids outside the vocabulary [0, {self.config.vocab_size}) "
                                 "(-1 marks a position that starts as noise)")
        elif t.dtype != torch.bool:
            raise ValueError(f"{name} must be a boolean mask")
        return t.to(dtype).contiguous()

    # ---- generation --------------------------------------------------------------------------------------------
    def generate(self, prompt_ids, *, max_new_tokens=None, max_denoising_steps=None, entropy_bound=None,
                 t_min=None, t_max=None, stability_threshold=None, confidence_threshold=None, seed=None,
                 canvas=None, pinned=None, on_step: Callable[[StepEvent], None] | None = None,
                 prefix_cache: PrefixCache | None = None) -> GenerationResult:
        """Generate new tokens after each prompt. Settings left None take the checkpoint's defaults.
        `canvas` ([C] or [B, C] ids; -1 = start from noise) starts the first canvas; `pinned` (same shape, bool)
        holds those positions of `canvas` fixed at every step. `on_step` gets a StepEvent after each step.
        `prefix_cache` (one prompt at a time): reuse the encoder cache of a stored prompt that this one extends."""
        settings = self.settings.replace(
            max_new_tokens=max_new_tokens, max_denoising_steps=max_denoising_steps, entropy_bound=entropy_bound,
            t_min=t_min, t_max=t_max, stability_threshold=stability_threshold,
            confidence_threshold=confidence_threshold,
        )
        rows = self.prompt_rows(prompt_ids)
        b, c, context = len(rows), self.config.canvas_length, self.config.max_position_embeddings
        needed = max(len(r) for r in rows) + -(-settings.max_new_tokens // c) * c
        if needed > context:
            raise ValueError(f"a prompt of {max(len(r) for r in rows)} tokens and max_new_tokens "
                             f"{settings.max_new_tokens} (canvases of {c}) need {needed} positions; the model's "
                             f"context is {context}")
        if pinned is not None and canvas is None:
            raise ValueError("pinned needs a canvas holding the pinned ids")
        canvas_t = self.canvas_ids(canvas, b, "canvas") if canvas is not None else None
        pinned_t = self.canvas_ids(pinned, b, "pinned", torch.bool) if pinned is not None else None
        if pinned_t is not None and bool((pinned_t & (canvas_t < 0)).any()):
            raise ValueError("a pinned position holds -1 (noise); pinned positions need real token ids")
        return generate(self.net, rows, settings, generator=self.generator(seed), canvas=canvas_t, pinned=pinned_t,
                        on_step=on_step, prefix_cache=prefix_cache)

    def generator(self, seed: int | None) -> torch.Generator | None:
        """A generator on the model's device seeded with `seed`; None (the global generator) without a seed."""
        if seed is None:
            return None
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2**63 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
        return torch.Generator(device=self.device).manual_seed(int(seed))

    @torch.no_grad()
    def canvas_logits(self, prompt_ids, canvas_ids, self_conditioning_logits=None) -> torch.Tensor:
        """The decoder's soft-capped float32 logits [B, C, V] for `canvas_ids` with the prompts as cached prefix."""
        ids, valid = self._prompts(prompt_ids)
        canvas = self.canvas_ids(canvas_ids, ids.shape[0], "canvas_ids")
        cache = KVCache(self.config, ids.shape[0], self.device)
        self.net.encode(ids, cache, valid)
        sc = None
        if self_conditioning_logits is not None:
            sc = torch.as_tensor(self_conditioning_logits, device=self.device)
            want = (ids.shape[0], self.config.canvas_length, self.config.vocab_size)
            if tuple(sc.shape) != want:
                raise ValueError(f"self_conditioning_logits must have shape {want}, got {tuple(sc.shape)}")
            sc = sc.to(self.dtype)
        return self.net.decode(canvas, cache, sc)

    def infill(self, prefix_ids: list[int], suffix_ids: list[int], fill_length: int, *, best_of: int = 1,
               **kw) -> GenerationResult:
        """Fill `fill_length` tokens between a prefix (read by the encoder) and a suffix (pinned in the canvas right
        after the hole; cut to what fits in one canvas). Returns the filled ids (EOS and pad dropped).
        `best_of` > 1 fills the hole that many times in one batch (the rows start from different noise) and returns
        the fill that, followed by the pinned suffix, the model's own causal pass scores most likely after the prefix
        (`fit_scores`): the fill that best leads into the text after it (an empty fill before an empty suffix
        ranks last). Its `steps` then count the decoder passes of every candidate row plus one scoring pass each, and
        `tokens_per_forward` is the chosen fill's generated tokens over that count."""
        c = self.config.canvas_length
        if not isinstance(fill_length, int) or not 0 < fill_length <= c:
            raise ValueError(f"fill_length must be an integer in [1, {c}], got {fill_length!r}")
        if isinstance(best_of, bool) or not isinstance(best_of, int) or best_of <= 0:
            raise ValueError(f"best_of must be a positive integer, got {best_of!r}")
        suffix = plain_ids(list(suffix_ids))[: c - fill_length]
        if (bad := bad_token_id(suffix, self.config.vocab_size)) is not None:
            raise ValueError(f"suffix_ids: token id {bad!r} is outside the vocabulary [0, {self.config.vocab_size})")
        start = torch.full((c,), -1, dtype=torch.long)  # the hole and anything after the suffix start as noise
        start[fill_length:fill_length + len(suffix)] = torch.tensor(suffix, dtype=torch.long)
        hold = torch.zeros(c, dtype=torch.bool)
        hold[fill_length:fill_length + len(suffix)] = True
        if kw.pop("max_new_tokens", None) is not None:
            raise ValueError("infill takes fill_length, not max_new_tokens")
        kw["max_new_tokens"] = fill_length  # one canvas; only the hole's ids are returned
        if best_of == 1:
            return self.generate([list(prefix_ids)], canvas=start, pinned=hold, **kw)
        rows = self.generate([list(prefix_ids)] * best_of, canvas=start.expand(best_of, c),
                             pinned=hold.expand(best_of, c), **kw)
        scores = fit_scores(self.net, list(prefix_ids), [fill + suffix for fill in rows.token_ids])  # [best_of]
        best = int(scores.argmax())
        passes = sum(sum(steps) for steps in rows.steps) + best_of
        generated = rows.tokens_per_forward[best] * sum(rows.steps[best])  # its tokens, an EOS included
        return GenerationResult([rows.token_ids[best]], [generated / passes], [[passes]], [rows.finish_reasons[best]])

    # ---- text helpers ------------------------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json; pass token ids to generate(), or load it with "
                             "load(..., tokenizer=DIR_OR_REPO_ID)")
        return self.tokenizer

    def complete(self, text: str | list[str], **kw) -> TextResult:
        """Continue raw text (a string or a list of strings); BOS is prepended when the model has one."""
        tok = self._need_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or any(not isinstance(t, str) or not t for t in texts):
            raise ValueError("empty prompt: complete() needs non-empty text")
        bos = [] if self.config.bos_token_id is None else [self.config.bos_token_id]  # the model's, whatever the tokenizer
        prompts = [bos + tok.encode(t) for t in texts]
        result = self.generate(prompts, **kw)
        return TextResult([tok.decode(ids) for ids in result.token_ids], result)

    def chat(self, messages: list[dict], *, thinking: bool = False, **kw) -> TextResult:
        """Answer one conversation rendered with the checkpoint's chat template. Where the vocabulary has the
        reasoning channel's markers, what the model writes in that channel comes apart as `reasoning`."""
        from .serve.text import Choice, channel_ids

        tok = self._need_tokenizer()
        result = self.generate([tok.encode_chat(messages, thinking=thinking)], **kw)
        channel = channel_ids(tok)
        if channel is None:
            return TextResult([tok.decode(ids) for ids in result.token_ids], result)
        reasoning, text = zip(*(Choice(tok, channel=channel).feed(ids, True) for ids in result.token_ids))
        return TextResult(list(text), result, list(reasoning))

    def parameter_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.net.state_dict().values())


def model_path(path_or_repo_id: str | os.PathLike | None) -> str:
    """`path_or_repo_id` as a string, or the bundled model's directory when it is None."""
    if path_or_repo_id is not None:
        return str(path_or_repo_id)
    if BUNDLED.is_dir():
        return str(BUNDLED)
    raise ValueError("no model given and this install has no bundled model; pass a checkpoint directory or Hub id "
                     "(`dgemma init DIR` writes a random one)")


def load_tokenizer(path_or_repo_id: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of a directory, its tokenizer.json, or a Hub repo id (only its tokenizer and config files are
    downloaded); with `vocab_size`, checked to fit a model with that many token ids."""
    path = Path(path_or_repo_id).expanduser()
    path = path.parent if path.is_file() and path.name == "tokenizer.json" else path
    try:
        tok = Tokenizer.from_dir(path if path.is_dir() else checkpoint.resolve(path_or_repo_id, weights=False))
    except checkpoint.CheckpointError:  # a missing path, or a file other than tokenizer.json
        raise ValueError(f"no tokenizer at {path_or_repo_id}: give a directory holding tokenizer.json, that file, "
                         "or a Hub repo id") from None
    if tok is None:
        raise ValueError(f"{path_or_repo_id}: no tokenizer.json")
    return tok if vocab_size is None else tok.check_fits(vocab_size, path_or_repo_id)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` (default: the CPU) as a torch.device; ValueError naming the problem for an unknown device, or a GPU
    that this machine or this PyTorch build lacks."""
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; expected e.g. cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "" if torch.version.cuda or torch.version.hip else " (this PyTorch is a CPU-only build)"
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available{build}")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), numbered from 0")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available here")
    return dev


def load(path_or_repo_id: str | os.PathLike | None = None, device=None, dtype=None,
         tokenizer: str | os.PathLike | None = None) -> Model:
    """Load a checkpoint directory (or a Hub repo id, downloaded on first use; or a .gguf file; default: the bundled
    model) onto `device` in `dtype` (default: the checkpoint's stored dtype; a .gguf file's float tensors: `quant.gguf_dtype`). Quantized and
    FP8 directories keep their weight format. `tokenizer` (a directory or Hub repo id, `load_tokenizer`) replaces the
    checkpoint's own; this is how a .gguf file whose vocabulary is not read (`GGUFFile.tokenizer`) takes text."""
    path_or_repo_id = model_path(path_or_repo_id)
    device = resolve_device(device)
    if quant.is_gguf(path_or_repo_id):
        net, settings, tok, path = quant.load_gguf(path_or_repo_id, device, _dtype(dtype), tokenizer is None)
    else:
        path = checkpoint.resolve(path_or_repo_id)
        cfg, settings = checkpoint.read_config(path)
        load_weights = quant.weight_loader(path) or checkpoint.load_weights
        net = load_weights(path, cfg, _dtype(dtype), device)
        tok = Tokenizer.from_dir(path) if tokenizer is None else None
    if tokenizer is not None:  # the checkpoint's own tokenizer is not read
        tok = load_tokenizer(tokenizer, net.config.vocab_size)
    return Model(net, settings, tok, path)
