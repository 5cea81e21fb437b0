"""The encoder's key/value cache, which the decoder reads and never writes.

Owns: per-layer keys and values, how many slots have been written (`length`, the same for every row of the batch),
which of those slots are real tokens (`valid`, False for left padding), the rotary position of each slot, and the
masks that say which cached slots a query may see. Sliding layers keep only the last (sliding_window - 1) slots, as
the reference's cache does; full layers keep everything.
Positions: a slot's position is its index, as in the reference (a left-padded prompt starts past its padding), unless
rows were joined from caches of other lengths (`concat`) or leading slots were dropped (`select`): then `offset` [B]
holds position - slot per row, so every row keeps the positions it was encoded with and continues from them.
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
        self.offset: torch.Tensor | None = None  # [B] long, position - slot per row; None = all 0

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

    def positions(self, t: int, device) -> torch.Tensor:
        """Rotary positions of the next `t` slots: [t], or [B, t] when rows have offsets."""
        slots = torch.arange(self.length, self.length + t, device=device)
        return slots if self.offset is None else slots[None, :] + self.offset[:, None]

    def _replace(self, keep, length: int, valid: torch.Tensor, offset: torch.Tensor) -> KVCache:
        """A cache with `keep(tensor, layer_type, kept)` applied to every layer's keys and values."""
        out = object.__new__(KVCache)
        out.__dict__.update(self.__dict__)
        out.length, out.valid, out.offset = length, valid, offset
        kept = {kind: out.kept(kind) for kind in set(self.layer_types)}
        out.keys = [keep(k, kind, kept[kind]) for k, kind in zip(self.keys, self.layer_types)]
        out.values = [keep(v, kind, kept[kind]) for v, kind in zip(self.values, self.layer_types)]
        return out

    def _offsets(self) -> torch.Tensor:
        if self.offset is not None:
            return self.offset
        return torch.zeros(self.batch_size, dtype=torch.long, device=self.valid.device)

    def pad_left(self, n: int) -> KVCache:
        """The same rows after `n` more invalid slots on the left (their positions stay as they were)."""
        if n == 0:
            return self

        def keep(t, kind, kept):  # t [B, Hkv, S, D] -> [B, Hkv, kept, D], zeros in the new slots
            return None if t is None else torch.cat([t.new_zeros(*t.shape[:2], kept - t.shape[2], t.shape[3]), t], 2)

        valid = torch.cat([self.valid.new_zeros(self.batch_size, n), self.valid], dim=1)
        return self._replace(keep, self.length + n, valid, self._offsets() - n)

    @staticmethod
    def concat(first: KVCache, second: KVCache) -> KVCache:
        """One cache holding the rows of `first` then those of `second`: the shorter is padded on the left, and
        each row keeps its positions. Both must have been written (length > 0)."""
        length = max(first.length, second.length)
        a, b = first.pad_left(length - first.length), second.pad_left(length - second.length)
        out = a.snapshot()
        out.keys = [torch.cat([x, y]) for x, y in zip(a.keys, b.keys)]
        out.values = [torch.cat([x, y]) for x, y in zip(a.values, b.values)]
        out.valid = torch.cat([a.valid, b.valid])
        out.offset = torch.cat([a._offsets(), b._offsets()])
        return out

    def select(self, rows: torch.Tensor) -> KVCache:
        """The cache of `rows` ([R] long indices), without leading slots that are padding in every kept row."""
        valid = self.valid[rows]
        drop = int(valid.int().argmax(dim=1).min())  # slots before the earliest first real token

        def keep(t, kind, kept):
            return None if t is None else t[rows][:, :, t.shape[2] - kept:]

        return self._replace(keep, self.length - drop, valid[:, drop:], self._offsets()[rows] + drop)

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


class StaticKVCache:
    """A preallocated encoder cache for token-by-token decoding: every layer keeps `capacity` slots (sliding layers
    see only their window through the mask instead of dropping old slots), and the written length lives on the device
    (`pos`), so one encoder pass reads and writes the same tensors whatever the step: it can be captured once as a
    CUDA graph and replayed for every token. Same interface as KVCache for `DiffusionGemma.encode`; the keys a pass
    attends to are the `capacity` slots (unwritten ones masked out) followed by its own new ones.
    Must not: grow, or read the device (no host synchronisation)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.layer_types = cfg.layer_types
        self.window = cfg.sliding_window
        self.capacity = capacity
        self.keys = [torch.zeros(batch_size, cfg.layer_kv_heads[i], capacity, cfg.layer_head_dims[i], dtype=dtype,
                                 device=device) for i in range(cfg.num_hidden_layers)]  # [B, Hkv, capacity, D]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)  # [B, capacity]
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # slots written so far
        self.slots = torch.arange(capacity, device=device)  # [capacity]

    def positions(self, t: int, device) -> torch.Tensor:
        return self.pos + torch.arange(t, device=device)  # [t]

    def cached(self, layer: int):
        return self.keys[layer], self.values[layer]

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values [B, Hkv, capacity + T, D] (the slots, then T new): write the new ones at slots pos.."""
        t = keys.shape[2] - self.capacity
        at = self.positions(t, keys.device)
        self.keys[layer].index_copy_(2, at, keys[:, :, -t:])
        self.values[layer].index_copy_(2, at, values[:, :, -t:])

    def advance(self, valid_new: torch.Tensor) -> None:
        """Mark T more slots written; valid_new [B, T] bool."""
        self.valid.index_copy_(1, self.positions(valid_new.shape[1], valid_new.device), valid_new.bool())
        self.pos.add_(valid_new.shape[1])

    def encoder_masks(self, new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Masks [B, 1, T, capacity + T] for T new causal queries: written, real slots, then the new tokens, with
        the same visibility as KVCache.encoder_masks (sliding layers: within the window)."""
        t = new.shape[1]
        q = self.positions(t, new.device)  # [T] the queries' slots, which are also the new keys' slots
        written = self.valid[:, None, :]  # [B, 1, capacity]: only written slots are ever marked valid
        causal = (q[None, :] <= q[:, None])[None] & new.bool()[:, None, :]  # [B, T, T]
        itself = torch.eye(t, dtype=torch.bool, device=new.device)[None]  # a query always sees itself
        masks = {}
        for kind in set(self.layer_types):
            old, fresh = written.expand(-1, t, -1), causal
            if kind == SLIDING:
                old = old & (q[:, None] - self.slots[None, :] < self.window)[None]
                fresh = fresh & (q[:, None] - q[None, :] < self.window)[None]
            masks[kind] = torch.cat([old, fresh | itself], dim=-1)[:, None]
        return masks
