"""Prefix reuse: the encoder caches of recent prompts, so a prompt that extends one (the next turn of a chat, a shared
system prompt) encodes only its new tokens.

Owns `PrefixCache`: up to `capacity` (prompt ids, KVCache snapshot) entries of single-row prompts, least recently used
first out; `match` finds the longest stored prompt that is a proper prefix of a new one (at least one new token must
remain: the encoder's last position is what the canvas continues from). A snapshot shares tensors with the cache it
came from, and caches replace their tensors on every write, so a stored entry never changes and reusing it copies
nothing. Positions continue from the stored length, so the result equals encoding the whole prompt at once up to
float rounding (the cached == recomputed invariant).
Must not: run the network, or hold batches of several rows (left padding would differ from row to row).
"""

from __future__ import annotations

from collections import OrderedDict

from .cache import KVCache


class PrefixCache:
    def __init__(self, capacity: int = 4):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self.hits = 0  # prompts that reused an entry
        self.reused_tokens = 0  # prompt tokens not encoded again thanks to them

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, ids: list[int]) -> tuple[KVCache, int] | None:
        """(a snapshot of the cache, its length) for the longest stored proper prefix of `ids`, or None."""
        best = None
        for key in self._entries:
            if len(key) < len(ids) and (best is None or len(key) > len(best)) and tuple(ids[:len(key)]) == key:
                best = key
        if best is None:
            return None
        self._entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += len(best)
        return self._entries[best].snapshot(), len(best)

    def store(self, ids: list[int], cache: KVCache) -> None:
        """Keep a snapshot of `cache`, which holds exactly the encoded `ids` of one row."""
        if cache.batch_size != 1 or cache.length != len(ids):
            raise ValueError("a prefix entry needs a one-row cache holding exactly its ids")
        self._entries[tuple(ids)] = cache.snapshot()
        self._entries.move_to_end(tuple(ids))
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
