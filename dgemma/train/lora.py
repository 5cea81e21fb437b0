"""Low-rank adapters (LoRA) for the attention and dense-MLP projections; the experts are left alone.

Owns: swapping the targeted nn.Linear modules of a built network for `LoRALinear` (base frozen, A random, B zero so
training starts from the base model), the adapters' files (adapter_model.safetensors + adapter_config.json),
loading them back, and merging them into plain nn.Linear weights.
Must not: change the network's math when the adapters are zero, or touch the router and experts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..model.diffusion_gemma import DiffusionGemma

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 0  # 0 = no adapters
    alpha: float = 16.0
    targets: tuple = ATTENTION + DENSE_MLP


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * x A^T B^T with A [rank, in], B [out, rank]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=False)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            out.weight = nn.Parameter((self.base.weight.float() + delta).to(self.base.weight.dtype),
                                      requires_grad=False)
        return out


def _targets(net: DiffusionGemma, cfg: LoRAConfig):
    """(parent module, attribute name, qualified name) of every targeted projection."""
    unknown = set(cfg.targets) - set(ATTENTION + DENSE_MLP)
    if unknown:
        raise ValueError(f"lora.targets: {sorted(unknown)} are not attention or dense-MLP projections "
                         f"({', '.join(ATTENTION + DENSE_MLP)})")
    for i, layer in enumerate(net.layers):
        for block_name, block, names in (("self_attn", layer.self_attn, ATTENTION), ("mlp", layer.mlp, DENSE_MLP)):
            for name in names:
                if name in cfg.targets and getattr(block, name, None) is not None:
                    yield block, name, f"layers.{i}.{block_name}.{name}"


def apply(net: DiffusionGemma, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Freeze `net` and wrap the targeted projections with adapters; returns their names."""
    if cfg.rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {cfg.rank}")
    net.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    names = []
    for block, name, qualified in list(_targets(net, cfg)):
        setattr(block, name, LoRALinear(getattr(block, name), cfg.rank, cfg.alpha, gen))
        names.append(qualified)
    return names


def save_adapters(adapters: dict[str, torch.Tensor], cfg: LoRAConfig, directory: Path) -> None:
    """Write `adapters` (a state dict's ".lora_" tensors) and `cfg` into `directory`."""
    save_file(adapters, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({**asdict(cfg), "targets": list(cfg.targets)}))


def load_adapters(net: DiffusionGemma, directory: Path) -> LoRAConfig:
    """Wrap `net` as the saved adapter config says and load the adapter weights into it."""
    path = Path(directory)
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{path}: no adapter_config.json")
    raw = json.loads((path / "adapter_config.json").read_text())
    cfg = LoRAConfig(rank=raw["rank"], alpha=raw["alpha"], targets=tuple(raw["targets"]))
    apply(net, cfg)
    missing, unexpected = net.load_state_dict(load_file(str(path / "adapter_model.safetensors")), strict=False)
    if unexpected or any(".lora_" in k for k in missing):
        raise ValueError(f"{path}: adapter weights do not match the model ({(unexpected or missing)[0]})")
    return cfg


def merge(net: DiffusionGemma) -> DiffusionGemma:
    """Fold every adapter into its base weight, leaving plain nn.Linear modules."""
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return net
