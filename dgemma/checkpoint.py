"""Checkpoint directories in the Hugging Face layout: read and write.

Owns: finding the files (config.json, generation_config.json, model.safetensors or shards with their index; a Hub
repo id is downloaded first), mapping tensor names (the official layout and transformers' save_pretrained) onto
`DiffusionGemma`'s parameters, and loading tensor by tensor straight into the target dtype and device (the network is
built on the meta device, so no float32 copy of the whole model ever exists). Writing is atomic: files go to a
temporary directory that replaces the target in one rename.
Must not: unpickle anything, run remote code, or know about generation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import GenerationSettings, ModelConfig
from .model.diffusion_gemma import DiffusionGemma
from .tokenizer import Tokenizer

# Prefixes under which the shared text weights may be stored; the first is what we write.
_DECODER = "model.decoder."
_ENCODER = "model.encoder.language_model."
_SHARED_PREFIXES = (_DECODER, _ENCODER, "model.language_model.", "model.")
_SKIPPED = ("model.encoder.vision_tower.", "model.encoder.embed_vision.", "model.vision_tower.", "model.embed_vision.")
_SCALAR = re.compile(r"layers\.(\d+)\.layer_scalar$")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file or tensor."""


def resolve(path_or_repo_id: str | os.PathLike, weights: bool = True) -> Path:
    """A local directory for `path_or_repo_id`, downloading a Hub repo's json/safetensors/tokenizer files (without
    `weights`, no safetensors) if the argument is not an existing path."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory")
    text = str(path_or_repo_id)
    if path.suffix.lower() == ".gguf":
        raise CheckpointError(f"no GGUF file at {text}")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"no checkpoint directory at {text}")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.jinja", "tokenizer*"] + (["*.safetensors"] if weights else [])
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as err:  # the Hub client's errors (network, unknown repo, bad id) have no common base
        raise CheckpointError(f"no checkpoint directory at {text}, and no Hub repo of that id could be fetched "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def read_config(path: Path) -> tuple[ModelConfig, GenerationSettings]:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        cfg = ModelConfig.from_hf_dict(_read_json(path / "config.json"))
        gen_path = path / "generation_config.json"
        settings = GenerationSettings.from_hf_dict(_read_json(gen_path)) if gen_path.is_file() else GenerationSettings()
    except CheckpointError:
        raise
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return cfg, settings


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} names {f.name}, which is missing")
        return files
    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() \
        else sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors weights (pickled weights are never loaded)")
    return files


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(path: Path) -> torch.dtype:
    """The floating dtype of the first float weight, which loading takes by default; read from the safetensors
    headers only. Scales and offsets of quantized weights are not weights (they may be float32 beside bfloat16)."""
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    kind = f.get_slice(name).get_dtype()
                    if kind in _SAFETENSORS_DTYPES and not name.endswith(("_scale", "_scale_inv", "_offset")):
                        return _SAFETENSORS_DTYPES[kind]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from None
    raise CheckpointError(f"{path}: no floating-point weights")


def _target(name: str) -> str | None:
    """Our parameter name for a checkpoint tensor name; None if it is skipped (vision) or unknown."""
    if name.startswith(_SKIPPED):
        return None
    if name == "lm_head.weight":
        return "lm_head"
    for prefix in _SHARED_PREFIXES:
        if name.startswith(prefix):
            local = name[len(prefix):]
            match = _SCALAR.match(local)
            if match:
                side = "encoder" if prefix == _ENCODER else "decoder"
                return f"{side}_layer_scalars.{match.group(1)}"
            return local
    return None


def load_weights(path: Path, cfg: ModelConfig, dtype: torch.dtype | None, device: torch.device) -> DiffusionGemma:
    """Build the network on the meta device and fill it tensor by tensor from the safetensors files."""
    with torch.device("meta"):
        net = DiffusionGemma(cfg)
    wanted = dict(net.state_dict())
    state: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[int, torch.Tensor]] = {"encoder": {}, "decoder": {}}
    lm_head = None
    skipped_vision = 0
    for file in _weight_files(path):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from None
        with handle as f:
            for name in f.keys():
                target = _target(name)
                if target is None:
                    if name.startswith(_SKIPPED):
                        skipped_vision += 1
                        continue
                    raise CheckpointError(f"{file.name}: unexpected tensor {name!r}")
                if target in state:
                    continue  # the same shared weight stored under a second prefix
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError) as err:
                    raise CheckpointError(f"{file}: cannot read tensor {name!r} ({err})") from None
                if dtype is None and tensor.is_floating_point():
                    dtype = tensor.dtype
                tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
                if target == "lm_head":
                    lm_head = tensor
                elif "_layer_scalars." in target:
                    side, idx = target.split("_layer_scalars.")
                    scalars[side][int(idx)] = tensor.reshape(())
                else:
                    expected = wanted.get(target)
                    if expected is None:
                        raise CheckpointError(f"{file.name}: unexpected tensor {name!r}")
                    if tuple(tensor.shape) != tuple(expected.shape):
                        raise CheckpointError(
                            f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {tuple(expected.shape)}"
                        )
                    state[target] = tensor
    if "embed_tokens.weight" not in state and lm_head is not None:
        state["embed_tokens.weight"] = lm_head
    for side, other in (("encoder", "decoder"), ("decoder", "encoder")):
        values = [scalars[side].get(i, scalars[other].get(i)) for i in range(cfg.num_hidden_layers)]
        values = [torch.ones((), dtype=dtype, device=device) if v is None else v for v in values]
        state[f"{side}_layer_scalars"] = torch.stack(values)
    missing = [k for k in wanted if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: checkpoint is missing tensor {_DECODER}{missing[0]}{more}")
    if skipped_vision:
        print(f"dgemma: skipped {skipped_vision} vision tensors (image input is not supported)", file=sys.stderr)
    net.load_state_dict(state, assign=True, strict=True)
    net.requires_grad_(False)
    return net.eval()


def check_new_directory(path: str | os.PathLike) -> None:
    """CheckpointError unless `path` is free for a new directory: absent, or an empty directory."""
    path = Path(path)
    if path.is_symlink():
        raise CheckpointError(f"{path} is a symbolic link; give the directory it points to")
    if path.is_dir() and any(path.iterdir()) or path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} already exists and is not an empty directory; choose a new output path "
                              "(nothing is overwritten)")


def fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk (directories: where the system allows it)."""
    if path.is_dir() and os.name == "nt":
        return  # directories cannot be opened for flushing there
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` a file beside `path`, flush it to disk, then rename it to `path`: readers see the old file or
    the whole new one, never a part. The temporary file is removed if `write` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False):
    """Yield a temporary directory beside `path`; when the block succeeds its files are flushed to disk and it takes
    the place of `path` (an older directory there is moved aside first and removed last); when it fails it is removed
    and `path` is untouched.
    Without `replace`, a file or non-empty directory at `path` is refused first (`check_new_directory`)."""
    path = Path(path)
    if not replace:
        check_new_directory(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}")
    tmp.mkdir()  # not mkdtemp, whose directory is private: this one gets the umask's permissions, as the result should
    try:
        yield tmp
        for f in [*(f for f in tmp.rglob("*") if f.is_file()), tmp]:
            fsync(f)  # the data is on disk before any name points at it
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(net: DiffusionGemma, settings: GenerationSettings, path: str | os.PathLike,
         tokenizer: Tokenizer | None = None, extra: Callable[[Path], None] | None = None,
         replace: bool = False) -> Path:
    """Write `net` as a checkpoint directory (config.json, generation_config.json, model.safetensors, the
    tokenizer's files if given, and whatever `extra(tmp_dir)` writes). Atomic: the files are written to a temporary
    directory that then takes the place of `path`; an existing one only with `replace` (see `atomic_directory`)."""
    with atomic_directory(path, replace) as tmp:
        tensors = {}
        for name, tensor in net.state_dict().items():
            tensor = tensor.detach()
            if name in ("encoder_layer_scalars", "decoder_layer_scalars"):
                prefix = _ENCODER if name.startswith("encoder") else _DECODER
                for i, value in enumerate(tensor):
                    tensors[f"{prefix}layers.{i}.layer_scalar"] = value.reshape(1).contiguous().cpu()
            else:
                tensors[_DECODER + name] = tensor.contiguous().cpu()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = net.config.to_hf_dict()
        cfg["dtype"] = str(net.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(settings.to_hf_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra is not None:
            extra(tmp)
    return Path(path)
