"""Quantized checkpoint directories: the streaming converter (`quantize`) and their loader (`load_weights`).

On disk a quantized directory is an ordinary checkpoint directory: the same tensor names, and for each quantized weight
`NAME` its codes under `NAME`, its scales under `NAME_scale` and (when it has them) its offsets under `NAME_offset`, in
model*.safetensors files. config.json carries the format (never the file names):

    "quantization_config": {"quant_method": "dgemma", "format": "int4", "group_size": 64, "dense": "int8",
                            "embedding": "int8"}

`format` applies to the expert weights; `dense` ("int8" or "int4"; absent = `format`) to the other linears (attention,
dense and self-conditioning MLPs); `embedding` ("int8", "int4" or null for float) to the tied embedding; `group_size`
(every quantized weight's, the embedding's too) is null for int8 per output channel. Norms, the router, scales and layer scalars stay in their stored float dtype.

`quantize` reads a float, FP8 or GGUF source one tensor at a time, quantizes it, and writes shards of at most
`shard_bytes`, so converting the 50 GB release needs a few GB of memory. Output appears atomically (written to a
temporary directory that replaces `out` at the end).
Must not: hold a whole model in memory, or know the layer math.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import checkpoint
from ..checkpoint import atomic_directory, check_new_directory
from ..config import ModelConfig
from ..model.diffusion_gemma import DiffusionGemma
from .formats import INT4_GROUP_SIZES, QTensor, dequantize, quantize as quantize_tensor, quantized_nbytes
from .modules import EMBEDDING, build, role, weight_kind

METHOD = "dgemma"
Entry = tuple[str, "QTensor | torch.Tensor"]
_SUFFIXES = ("_scale", "_offset")
_KIND_OF_CODES = {torch.int8: "int8", torch.uint8: "int4"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1,
                "F8_E5M2": 1, "BOOL": 1, "I64": 8}


def metadata(path: Path) -> dict | None:
    """The `quantization_config` of a dgemma-quantized directory, validated; None for other checkpoints."""
    config = path / "config.json"
    if not config.is_file():
        return None
    meta = json.loads(config.read_text()).get("quantization_config")
    if not isinstance(meta, dict) or meta.get("quant_method") != METHOD:
        return None
    fmt, group, emb = meta.get("format"), meta.get("group_size"), meta.get("embedding")
    dense = meta.get("dense", fmt)
    for key, value in (("format", fmt), ("dense", dense)):
        if value not in ("int8", "int4"):
            raise checkpoint.CheckpointError(f"{config}: quantization_config.{key} is {value!r}, expected int8 or int4")
    if emb not in ("int8", "int4", None):
        raise checkpoint.CheckpointError(f"{config}: quantization_config.embedding is {emb!r}, expected int8, "
                                         "int4 or null")
    if group is not None and (not isinstance(group, int) or group < 2):
        raise checkpoint.CheckpointError(f"{config}: quantization_config.group_size is {group!r}")
    if "int4" in (fmt, dense, emb) and group is None:
        raise checkpoint.CheckpointError(f"{config}: int4 needs quantization_config.group_size")
    return {**meta, "dense": dense}


def _expected_kind(meta: dict, target: str) -> str | None:
    return weight_kind(role(target), meta["format"], meta["dense"], meta["embedding"])


_SAFETENSORS_TORCH = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class Tensors:
    """The tensors of a safetensors checkpoint directory, readable by name from whichever shard holds them; with
    `meta`, `read` gives tensors of the stored shape and dtype on the meta device (reading nothing but headers)."""

    def __init__(self, path: Path, meta: bool = False):
        self.path, self.meta = path, meta
        self._where: dict[str, object] = {}
        for file in checkpoint._weight_files(path):
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as err:
                raise checkpoint.CheckpointError(f"{file}: unreadable safetensors file ({err})") from None
            self._where.update({name: (file, handle) for name in handle.keys()})

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str) -> torch.Tensor:
        file, handle = self._where[name]
        if self.meta:
            info = handle.get_slice(name)
            return torch.empty(info.get_shape(), dtype=_SAFETENSORS_TORCH[info.get_dtype()], device="meta")
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise checkpoint.CheckpointError(f"{file}: cannot read tensor {name!r} ({err})") from None

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype code ("BF16", "F8_E4M3", ...), from the header."""
        return self._where[name][1].get_slice(name).get_dtype()

    def nbytes(self, name: str) -> int:
        return math.prod(self._where[name][1].get_slice(name).get_shape()) * _DTYPE_BYTES[self.stored_dtype(name)]

    def text(self) -> Iterator[tuple[str, str]]:
        """(checkpoint name, parameter name) of every text tensor; vision tensors and second copies of shared
        weights are skipped; a lone lm_head stands for the tied embedding."""
        targets = {checkpoint._target(n) for n in self._where}
        seen = set()
        for name, (file, _) in self._where.items():
            target = checkpoint._target(name)
            if target is None:
                if name.startswith(checkpoint._SKIPPED):
                    continue
                raise checkpoint.CheckpointError(f"{file.name}: unexpected tensor {name!r}")
            if target == "lm_head":
                if EMBEDDING in targets:
                    continue
                target = EMBEDDING
            if target not in seen:
                seen.add(target)
                yield name, target


def float_entries(tensors: Tensors) -> Iterator[Entry]:
    """(parameter name, float tensor) pairs of an unquantized checkpoint directory."""
    for name, target in tensors.text():
        yield target, tensors.read(name)


def quantized_entries(tensors: Tensors, meta: dict) -> Iterator[Entry]:
    """(parameter name, QTensor or float tensor) pairs of a dgemma-quantized directory, checked against `meta`."""
    path = tensors.path
    for name, target in tensors.text():
        if name.endswith(_SUFFIXES) and name.rsplit("_", 1)[0] in tensors:
            continue
        want = _expected_kind(meta, target)
        if name + "_scale" not in tensors:
            if want is not None:
                raise checkpoint.CheckpointError(f"{path}: tensor {name!r} is float, but config.json's "
                                                 f"quantization_config says {want}")
            yield target, tensors.read(name)
            continue
        codes = tensors.read(name)
        kind = _KIND_OF_CODES.get(codes.dtype)
        if kind != want:
            raise checkpoint.CheckpointError(f"{path}: tensor {name!r} is stored as {kind or codes.dtype}, but "
                                             f"config.json's quantization_config says {want}")
        offset = tensors.read(name + "_offset") if name + "_offset" in tensors else None
        try:
            yield target, QTensor(kind, codes, tensors.read(name + "_scale"), offset)
        except ValueError as err:
            raise checkpoint.CheckpointError(f"{path}: tensor {name!r}: {err}") from None


def load_weights(path: Path, cfg: ModelConfig, dtype: torch.dtype | None, device: torch.device) -> DiffusionGemma:
    """Load a dgemma-quantized directory (same signature as `checkpoint.load_weights`)."""
    meta = metadata(path)
    try:
        return build(cfg, quantized_entries(Tensors(path), meta), dtype, device, str(path))
    except checkpoint.CheckpointError:
        raise
    except ValueError as err:
        raise checkpoint.CheckpointError(str(err)) from None


def resident_bytes(cfg: ModelConfig, fmt: str, group_size: int | None, embedding: str | None,
                   float_bytes: int, dense: str | None = None) -> int:
    """Bytes a model of shape `cfg` occupies once loaded in this format (`dense` None = `fmt`; float tensors at
    `float_bytes` each), from the shapes alone: the network is built on the meta device."""
    with torch.device("meta"):
        net = DiffusionGemma(cfg)
    total = 0
    for target, t in net.state_dict().items():
        kind = weight_kind(role(target), fmt, dense, embedding)
        if kind is None:
            total += t.numel() * float_bytes
        else:
            total += quantized_nbytes(tuple(t.shape), kind, group_size)
    return total


def _disk_name(target: str) -> str:
    if "_layer_scalars." in target:
        side, idx = target.split("_layer_scalars.")
        prefix = checkpoint._ENCODER if side == "encoder" else checkpoint._DECODER
        return f"{prefix}layers.{idx}.layer_scalar"
    return checkpoint._DECODER + target


class _ShardWriter:
    """Collects tensors and writes model-NNNNN.safetensors files of at most `limit` bytes, then the index."""

    def __init__(self, directory: Path, limit: int):
        self.directory, self.limit = directory, limit
        self.tensors: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.tensors and self.size + nbytes > self.limit:
            self.flush()
        self.tensors[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if self.tensors:
            save_file(self.tensors, str(self.directory / f"part-{len(self.files):05d}.safetensors"),
                      metadata={"format": "pt"})
            self.files.append(list(self.tensors))
            self.tensors, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.directory / "part-00000.safetensors", self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / f"part-{i:05d}.safetensors", self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def resolve_formats(fmt: str, group_size: int | None, dense: str | None,
                    embedding: str | None) -> tuple[str, int | None, str]:
    """Checked (format, group size, dense format) with the defaults filled in: int4 groups of 64, dense = format."""
    if fmt not in ("int8", "int4"):
        raise ValueError(f"--to must be int8 or int4, got {fmt!r}")
    dense = dense or fmt
    if dense not in ("int8", "int4"):
        raise ValueError(f"--dense must be int8 or int4, got {dense!r}")
    if embedding not in ("int8", "int4", None):
        raise ValueError(f"embedding must be int8, int4 or None (float), got {embedding!r}")
    if fmt == "int4" and group_size is None:
        group_size = 64
    if group_size is not None and ("int4" in (fmt, dense, embedding) and group_size not in INT4_GROUP_SIZES):
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    for flag, kind in (("dense", dense), ("embedding", embedding)):
        if kind == "int4" and group_size is None:
            raise ValueError(f"--{flag} int4 needs a group size (--group-size 32, 64 or 128)")
    return fmt, group_size, dense


def quantize(src: str | os.PathLike, out: str | os.PathLike, fmt: str, group_size: int | None = None,
             embedding: str | None = "int8", shard_bytes: int = 2 << 30, progress: bool = True,
             dense: str | None = None, calibrated: dict[str, QTensor] | None = None) -> dict:
    """Convert the checkpoint at `src` (float or FP8 directory, Hub id, or .gguf file) to `fmt` ("int8"/"int4") in
    directory `out`, tensor by tensor. `group_size`: int4 group (32, 64 or 128); for int8, None = per output channel.
    `dense`: format of the linears outside the experts ("int8" or "int4"; None = `fmt`). `embedding`: format of the
    tied embedding ("int8", "int4" or None to keep it float). `calibrated`: weights already rounded for these formats
    (`gptq.calibrate`), by parameter name, written instead of rounding them to nearest. Returns a summary."""
    from tqdm import tqdm

    from . import open_source

    fmt, group_size, dense = resolve_formats(fmt, group_size, dense, embedding)
    out = Path(out)
    check_new_directory(out)  # before reading anything: an existing output (or the source itself) is never replaced
    src_info = open_source(src)
    with atomic_directory(out) as tmp:
        writer = _ShardWriter(tmp, shard_bytes)
        params = in_bytes = 0
        bar = tqdm(total=src_info.total_bytes, unit="B", unit_scale=True, desc="quantize", disable=not progress,
                   file=sys.stderr)
        float_dtype = None
        for target, value in src_info.entries:
            size = value.nbytes if isinstance(value, QTensor) else value.numel() * value.element_size()
            in_bytes += size
            kind = weight_kind(role(target), fmt, dense, embedding)
            if isinstance(value, QTensor):
                value = dequantize(value, torch.float32)
            params += 0 if "_layer_scalars." in target else value.numel()
            name = _disk_name(target)
            if kind is None:
                float_dtype = float_dtype or value.dtype
                writer.add(name, value)
            else:
                q = calibrated.get(target) if calibrated else None
                if q is None:
                    q = quantize_tensor(value, kind, group_size)
                elif q.kind != kind or q.shape != value.shape:
                    raise ValueError(f"calibrated weight {target!r} is {q.kind} {tuple(q.shape)}; the checkpoint "
                                     f"needs {kind} {tuple(value.shape)}")
                writer.add(name, q.codes)
                writer.add(name + "_scale", q.scale)
                if q.offset is not None:
                    writer.add(name + "_offset", q.offset)
            bar.update(size)
            del value
        bar.close()
        writer.close()
        config = src_info.config_dict
        config["quantization_config"] = {"quant_method": METHOD, "format": fmt, "group_size": group_size,
                                         "dense": dense, "embedding": embedding}
        config["dtype"] = str(float_dtype or torch.float32).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if src_info.directory is not None:
            for f in src_info.directory.iterdir():
                if f.is_file() and f.name != "config.json" and not f.name.startswith("model") \
                        and f.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"):  # weights
                    shutil.copy2(f, tmp / f.name)
        if src_info.tokenizer is not None:
            src_info.tokenizer.save(tmp)
        if not (tmp / "generation_config.json").is_file():
            (tmp / "generation_config.json").write_text(json.dumps(src_info.settings.to_hf_dict(), indent=2))
    return {"out": str(out), "parameters": params, "source_bytes": in_bytes, "bytes": writer.total,
            "bytes_per_parameter": writer.total / max(params, 1)}
