"""The encoder's key/value cache, which the decoder reads and never writes.

Owns: per-layer keys and values, how many positions have been written (`length`, the same for every row of the
batch), which of those positions are real tokens (`valid`, False for left padding), and the masks that say which
cached positions a query may see. Sliding layers keep only the last (sliding_window - 1) positions, as the
reference's cache does; full layers keep everything.
Must not: run layers or sample; it only stores tensors and builds masks.
"""

from __future__ import annotations

import torch

from ..config import SLIDING, ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device | str = "cpu"):
        self.layer_types = cfg.layer_types
        self.window = cfg.sliding_window
        self.keys: list[torch.Tensor | None] = [None] * cfg.num_hidden_layers  # [B, Hkv, S_layer, D]
        self.values: list[torch.Tensor | None] = [None] * cfg.num_hidden_layers
        self.length = 0
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # [B, length]

    def snapshot(self) -> KVCache:
        """A cache that shares today's tensors; later writes to either one do not show in the other (writes
        replace tensors, they never modify them in place)."""
        copy = object.__new__(KVCache)
        copy.__dict__.update(self.__dict__)
        copy.keys, copy.values = list(self.keys), list(self.values)
        return copy

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def kept(self, layer_type: str) -> int:
        """How many of the written positions a layer of this type still holds."""
        return min(self.length, self.window - 1) if layer_type == SLIDING else self.length

    def cached(self, layer: int):
        """The stored (keys, values) of a layer, or (None, None) before the first write."""
        return self.keys[layer], self.values[layer]

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace a layer's keys/values with `keys`/`values` [B, Hkv, S, D] (cache + new), trimmed to its window."""
        if self.layer_types[layer] == SLIDING:
            keys, values = keys[:, :, -(self.window - 1):], values[:, :, -(self.window - 1):]
        self.keys[layer], self.values[layer] = keys, values

    def advance(self, valid_new: torch.Tensor) -> None:
        """Record that the positions [length, length + T) were written; valid_new [B, T] bool."""
        self.valid = torch.cat([self.valid, valid_new.to(self.valid.device, torch.bool)], dim=1)
        self.length = self.valid.shape[1]

    def encoder_masks(self, new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Masks [B, 1, T, kept + T] for T new causal queries, per layer type. `new` [B, T] marks real tokens.
        A query always sees itself, so padding rows never attend to nothing."""
        t = new.shape[1]
        q_pos = torch.arange(self.length, self.length + t, device=new.device)
        masks = {}
        for kind in set(self.layer_types):
            kept = self.kept(kind)
            k_pos = torch.arange(self.length - kept, self.length + t, device=new.device)
            valid = torch.cat([self.valid[:, self.length - kept:], new.bool()], dim=1)  # [B, S]
            see = k_pos[None, :] <= q_pos[:, None]
            if kind == SLIDING:
                see = see & (q_pos[:, None] - k_pos[None, :] < self.window)
            mask = (see[None] & valid[:, None, :]) | (k_pos[None, :] == q_pos[:, None])[None]
            masks[kind] = mask[:, None]
        return masks

    def decoder_masks(self, canvas_length: int) -> dict[str, torch.Tensor]:
        """Masks [B, 1, C, kept + C] for a canvas that sees every real cached position it keeps and all of itself."""
        b = self.batch_size
        canvas = torch.ones(b, canvas_length, dtype=torch.bool, device=self.valid.device)
        masks = {}
        for kind in set(self.layer_types):
            valid = torch.cat([self.valid[:, self.length - self.kept(kind):], canvas], dim=1)
            masks[kind] = valid[:, None, None, :].expand(b, 1, canvas_length, valid.shape[1])
        return masks
