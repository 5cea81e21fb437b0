"""FP8 checkpoints as published for vLLM: read them into dgemma's "fp8" weight format (codes stay FP8 in memory).

Accepted: a checkpoint directory whose config.json has a `quantization_config` with
- `"quant_method": "compressed-tensors"` and 8-bit float weights (`format` "float-quantized"); scales under
  `NAME_scale` (e.g. `q_proj.weight_scale`) with the "tensor" (one value), "channel" ([N, 1]), "group" ([N, K/G]) or
  "block" ([N/bn, K/bk], `block_structure`) strategy; or
- `"quant_method": "fp8"` (the transformers FP8 layout): scales under `NAME_scale_inv`, blocks `weight_block_size`.
FP8 weights are float8_e4m3fn tensors. Experts come either as the fused 3-D tensors (`experts.gate_up_proj` with
`experts.gate_up_proj_scale`) or one linear per expert (`experts.E.gate_proj.weight`, `up_proj`, `down_proj`), which
are stacked into the fused layout. Static activation scales (`input_scale`) are dropped: activations stay in the
model's float dtype. Tensors left unquantized (the `ignore` list: embedding, router, norms) load as float.
Must not: quantize or requantize anything; it only re-expresses the stored scales.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator

import torch

from .. import checkpoint
from ..config import ModelConfig
from ..model.diffusion_gemma import DiffusionGemma
from .convert import Entry, Tensors
from .formats import QTensor
from .modules import build

_PER_EXPERT = re.compile(r"(layers\.\d+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DROPPED = ("input_scale", "weight_zero_point", "input_zero_point")


def metadata(path: Path) -> dict | None:
    """{"scale_suffix": ..., "block": (bn, bk) or None} for an FP8 checkpoint directory; None for other checkpoints.
    Raises for a compressed-tensors checkpoint that is not 8-bit float."""
    config = path / "config.json"
    if not config.is_file():
        return None
    meta = json.loads(config.read_text()).get("quantization_config")
    if not isinstance(meta, dict):
        return None
    method = meta.get("quant_method")
    if method == "fp8":
        block = meta.get("weight_block_size")
        return {"scale_suffix": "_scale_inv", "block": tuple(block) if block else None}
    if method != "compressed-tensors":
        return None
    block = None
    for name, group in (meta.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise checkpoint.CheckpointError(
                f"{config}: compressed-tensors group {name!r} holds {weights.get('num_bits')}-bit "
                f"{weights.get('type')} weights; only 8-bit float (FP8) weights are supported")
        if weights.get("strategy") == "block":
            block = tuple(weights.get("block_structure") or (128, 128))
    return {"scale_suffix": "_scale", "block": block}


def _scale(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int] | None, name: str) -> torch.Tensor:
    """A stored FP8 scale -> float32 [..., N, K / G] for weight `shape` [..., N, K]."""
    *lead, n, k = shape
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(1).expand(*lead, n, 1).contiguous()
    if lead and s.numel() == math.prod(lead) and s.shape[:len(lead)] == tuple(lead):  # one per expert
        return s.reshape(*lead, 1, 1).expand(*lead, n, 1).contiguous()
    if s.dim() == len(shape) - 1:  # one scale per row stored without its trailing 1
        s = s.unsqueeze(-1)
    if s.dim() == len(shape) and s.shape[-2] == n and k % s.shape[-1] == 0:
        return s.expand(*lead, n, s.shape[-1]).contiguous()
    if block is not None and s.dim() == len(shape):
        bn, bk = block
        if s.shape[-2] == math.ceil(n / bn) and s.shape[-1] == math.ceil(k / bk):
            g = math.gcd(k, bk)
            rows = s.repeat_interleave(bn, dim=-2)[..., :n, :]  # [..., N, ceil(K / bk)]
            return rows[..., torch.arange(k // g) * g // bk].contiguous()  # [..., N, K / g]
    raise checkpoint.CheckpointError(f"FP8 scale {name!r} has shape {tuple(scale.shape)}, which fits no known "
                                     f"layout for a weight of shape {tuple(shape)}")


def _stack(parts: list, name: str):
    """Per-expert values (all QTensor or all float) -> one value with a leading expert dimension."""
    if all(isinstance(p, QTensor) for p in parts):
        if len({(p.kind, p.group_size) for p in parts}) != 1:
            raise checkpoint.CheckpointError(f"{name}: experts are quantized with different group sizes")
        return QTensor(parts[0].kind, torch.stack([p.codes for p in parts]), torch.stack([p.scale for p in parts]))
    if any(isinstance(p, QTensor) for p in parts):
        raise checkpoint.CheckpointError(f"{name}: some experts are FP8 and some are not")
    return torch.stack(parts)


def _cat_rows(a, b):
    if isinstance(a, QTensor):
        if not isinstance(b, QTensor) or a.group_size != b.group_size:
            raise checkpoint.CheckpointError("an expert's gate_proj and up_proj are stored differently")
        return QTensor("fp8", torch.cat([a.codes, b.codes]), torch.cat([a.scale, b.scale]))
    return torch.cat([a, b])


def entries(tensors: Tensors, num_experts: int) -> Iterator[Entry]:
    """(parameter name, QTensor "fp8" or float tensor) pairs of an FP8 checkpoint directory."""
    path = tensors.path
    meta = metadata(path)
    suffix, block = meta["scale_suffix"], meta["block"]
    experts: dict[str, dict[int, dict[str, object]]] = {}
    for name, target in tensors.text():
        if name.endswith(suffix) and name[: -len(suffix)] in tensors or name.endswith(_DROPPED):
            continue
        value = tensors.read(name)
        if value.dtype == torch.float8_e4m3fn:
            if name + suffix not in tensors:
                raise checkpoint.CheckpointError(f"{path}: FP8 tensor {name!r} has no {name + suffix!r}")
            value = QTensor("fp8", value, _scale(tensors.read(name + suffix), value.shape, block, name + suffix))
        elif value.dtype.is_floating_point and value.element_size() == 1:
            raise checkpoint.CheckpointError(f"{path}: tensor {name!r} is {value.dtype}; only float8_e4m3fn FP8 "
                                             "weights are supported")
        match = _PER_EXPERT.fullmatch(target)
        if match is None:
            yield target, value
            continue
        module, index, proj = match.group(1), int(match.group(2)), match.group(3)
        layer = experts.setdefault(module, {})
        layer.setdefault(index, {})[proj] = value
        if len(layer) == num_experts and all(len(p) == 3 for p in layer.values()):
            del experts[module]
            ordered = [layer[e] for e in range(num_experts)]
            yield f"{module}.gate_up_proj", _stack([_cat_rows(p["gate_proj"], p["up_proj"]) for p in ordered],
                                                   module)
            yield f"{module}.down_proj", _stack([p["down_proj"] for p in ordered], module)
    if experts:
        raise checkpoint.CheckpointError(f"{path}: {next(iter(experts))} does not hold all {num_experts} experts "
                                         "with gate_proj, up_proj and down_proj")


def load_weights(path: Path, cfg: ModelConfig, dtype: torch.dtype | None, device: torch.device) -> DiffusionGemma:
    """Load an FP8 checkpoint directory (same signature as `checkpoint.load_weights`); FP8 weights stay FP8."""
    try:
        return build(cfg, entries(Tensors(path), cfg.num_experts), dtype, device, str(path))
    except checkpoint.CheckpointError:
        raise
    except ValueError as err:
        raise checkpoint.CheckpointError(str(err)) from None
