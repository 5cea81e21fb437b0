"""Quantized weights: int8 / int4 formats, quantized modules, checkpoint conversion, FP8 and GGUF import.

    quantize_model(net, "int4", 64)          swap a loaded float model's weights for quantized ones, in place
    quantize(src, out, "int4", 64)           convert a checkpoint (float, FP8 or .gguf) to a quantized directory
    gptq.calibrate(net, windows, "int4", 64) calibrated (GPTQ) weights to pass to either of the two above
    weight_loader(path)                      the loader `dgemma.load` uses for a quantized or FP8 directory
    load_gguf(path, device, dtype)           a model from a .gguf file
    describe(path, dtype)                    format and resident bytes of a quantized or FP8 directory (`dgemma info`)

Owns the dispatch between the formats (formats.py), the modules (modules.py), calibrated rounding (gptq.py), the
quantized directory layout (convert.py), FP8 (fp8.py) and GGUF (gguf.py). Must not: change the model code;
everything is swapped in after the network is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .. import checkpoint
from ..config import GenerationSettings
from ..model.diffusion_gemma import DiffusionGemma
from ..tokenizer import Tokenizer
from . import convert, fp8
from .convert import Entry, quantize
from .formats import QTensor, dequantize
from .gguf import GGUFFile, is_gguf
from .modules import build, is_quantized, quantize_model

__all__ = ["quantize_model", "quantize", "weight_loader", "load_gguf", "describe", "is_gguf", "open_source",
           "QTensor", "dequantize"]


@dataclass
class Source:
    """A checkpoint read tensor by tensor: its config.json dict, generation settings and (name, value) entries."""

    config_dict: dict
    settings: GenerationSettings
    entries: Iterator[Entry]
    total_bytes: int
    directory: Path | None  # where tokenizer and other side files live; None for a .gguf file
    tokenizer: Tokenizer | None = None  # a .gguf file's own tokenizer, written out with the conversion


def open_source(path_or_repo_id: str | os.PathLike) -> Source:
    """A float or FP8 checkpoint directory (or Hub id), or a .gguf file, opened for streaming conversion."""
    if is_gguf(path_or_repo_id):
        g = GGUFFile(path_or_repo_id)
        return Source(g.config.to_hf_dict(), g.settings, g.entries(), g.total_bytes, None, g.tokenizer())
    path = checkpoint.resolve(path_or_repo_id)
    cfg, settings = checkpoint.read_config(path)
    meta = convert.metadata(path)
    if meta is not None:
        raise ValueError(f"{path} is already quantized ({meta['format']}); convert from the float or FP8 checkpoint")
    tensors = convert.Tensors(path)
    total = sum(tensors.nbytes(name) for name, _ in tensors.text())
    entries = fp8.entries(tensors, cfg.num_experts) if fp8.metadata(path) else convert.float_entries(tensors)
    config_dict = json.loads((path / "config.json").read_text())
    config_dict.pop("quantization_config", None)
    return Source(config_dict, settings, entries, total, path)


def weight_loader(path: Path) -> Callable[..., DiffusionGemma] | None:
    """The weight loader for a dgemma-quantized or FP8 directory, with `checkpoint.load_weights`' signature;
    None for an ordinary float checkpoint."""
    if convert.metadata(path) is not None:
        return convert.load_weights
    if fp8.metadata(path) is not None:
        return fp8.load_weights
    return None


def gguf_dtype(device: torch.device) -> torch.dtype:
    """The dtype a .gguf file's float tensors load in by default: float32 on a CPU (a file's F16 norms and embedding
    would otherwise make a float16 model, slow there and narrow for Gemma's activations), bfloat16 on an accelerator
    (half the memory; the model's own dtype)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_gguf(path: str | os.PathLike, device: torch.device, dtype: torch.dtype | None, tokenizer: bool = True):
    """(network, generation settings, the file's own tokenizer or None, path) from a .gguf file; without
    `tokenizer`, the file's tokenizer metadata is not read (another tokenizer takes its place)."""
    g = GGUFFile(path)
    tok = g.tokenizer() if tokenizer else None  # before the weights: malformed metadata fails fast
    return build(g.config, g.entries(), dtype or gguf_dtype(device), device, str(g.path)), g.settings, tok, g.path


def describe(path: Path, dtype: torch.dtype) -> dict | None:
    """{"quantization": text, "resident_bytes": n} for a dgemma-quantized or FP8 directory (float tensors counted at
    `dtype`); None for a float checkpoint."""
    meta = convert.metadata(path)
    if meta is not None:
        cfg, _ = checkpoint.read_config(path)
        group = f" group {meta['group_size']}" if meta["group_size"] else " per channel"
        dense = "" if meta["dense"] == meta["format"] else f", dense layers {meta['dense']}"
        emb = f", embedding {meta['embedding'] or 'float'}"
        resident = convert.resident_bytes(cfg, meta["format"], meta["group_size"], meta["embedding"], dtype.itemsize,
                                          meta["dense"])
        return {"quantization": f"{meta['format']}{group}{dense}{emb}", "resident_bytes": resident}
    if fp8.metadata(path) is not None:
        # What the loader holds, from the headers alone: FP8 codes, their scales as float32 per row (and per block
        # of inputs), every other tensor at `dtype`.
        cfg, _ = checkpoint.read_config(path)
        resident = sum(v.nbytes if isinstance(v, QTensor) else v.numel() * dtype.itemsize
                       for _, v in fp8.entries(convert.Tensors(path, meta=True), cfg.num_experts))
        return {"quantization": "fp8 (e4m3, stored scales)", "resident_bytes": resident}
    return None
