"""Prefix reuse: a prompt that extends a stored one encodes only its new tokens and generates the same tokens."""

import pytest
import torch

from dgemma import PrefixCache
from dgemma.api import Model
from dgemma.config import preset
from dgemma.engine.cache import KVCache
from dgemma.model.diffusion_gemma import DiffusionGemma


@pytest.fixture(scope="module")
def model():
    return Model(DiffusionGemma(preset("tiny")).init_weights(5))


def _encoded_lengths(model, monkeypatch) -> list[int]:
    """Record the token count of every encoder call."""
    seen, encode = [], model.net.encode

    def spy(ids, cache, valid=None):
        seen.append(ids.shape[1])
        return encode(ids, cache, valid)
    monkeypatch.setattr(model.net, "encode", spy)
    return seen


def test_next_turn_reuses_the_stored_prompt(model, monkeypatch):
    first = list(range(3, 43))  # 40 tokens: longer than the tiny sliding window, so trimmed layers are reused too
    second = first + list(range(50, 61))
    kw = dict(max_new_tokens=2 * model.config.canvas_length, max_denoising_steps=6, seed=7)
    plain = model.generate([second], **kw)
    prefix = PrefixCache()
    seen = _encoded_lengths(model, monkeypatch)
    model.generate([first], prefix_cache=prefix, **kw)
    reused = model.generate([second], prefix_cache=prefix, **kw)
    assert seen[0] == len(first)
    assert seen[-2] == len(second) - len(first)  # the second prompt's own encode, then one canvas commit
    assert (prefix.hits, prefix.reused_tokens, len(prefix)) == (1, len(first), 2)
    assert reused.token_ids == plain.token_ids and reused.steps == plain.steps


def test_canvas_logits_after_a_reused_prefix_match_a_whole_encode(model):
    """The cache built in two encoder calls gives the decoder what one call gives it."""
    ids = torch.arange(3, 50)[None]
    canvas = torch.randint(0, model.config.vocab_size, (1, model.config.canvas_length),
                           generator=torch.Generator().manual_seed(1))
    whole = KVCache(model.config, 1)
    model.net.encode(ids, whole)
    split = KVCache(model.config, 1)
    model.net.encode(ids[:, :30], split)
    stored = PrefixCache()
    stored.store(ids[0, :30].tolist(), split)
    cache, n = stored.match(ids[0].tolist())
    model.net.encode(ids[:, n:], cache)
    with torch.no_grad():
        torch.testing.assert_close(model.net.decode(canvas, cache), model.net.decode(canvas, whole),
                                   rtol=1e-5, atol=1e-5)
    assert split.length == 30  # the stored entry was not extended by the later encode


def test_match_is_the_longest_proper_prefix_and_the_oldest_entry_goes_first():
    cfg = preset("tiny")

    def filled(n):
        cache = KVCache(cfg, 1)
        cache.advance(torch.ones(1, n, dtype=torch.bool))
        return cache
    prefix = PrefixCache(capacity=2)
    prefix.store([1, 2], filled(2))
    prefix.store([1, 2, 3], filled(3))
    assert prefix.match([1, 2, 3, 4])[1] == 3
    assert prefix.match([1, 2, 3])[1] == 2  # an equal prompt leaves nothing to encode: only shorter entries count
    assert prefix.match([2, 2, 3]) is None
    prefix.store([7], filled(1))  # evicts [1, 2, 3], the least recently used
    assert prefix.match([1, 2, 3, 4])[1] == 2
    with pytest.raises(ValueError, match="one-row cache"):
        prefix.store([1, 2], filled(3))
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(capacity=0)
