"""Autoregressive decoding with the causal encoder: cached == recomputed, batching, length cap, stop ids, seeds;
scoring continuations."""

import pytest
import torch

import dgemma
import dgemma.engine.ar
from dgemma.cli import main
from dgemma.engine.ar import ar_generate, ar_score, fit_scores
from dgemma.engine.cache import KVCache


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("ar") / "tiny"
    assert main(["init", str(path), "--preset", "tiny", "--seed", "3"]) == 0
    return dgemma.load(path).net


def naive_greedy(net, prompt, n):
    """Re-encode the whole sequence into a fresh cache every step and take the argmax of the last position."""
    seq = list(prompt)
    eos = set(net.config.eos_token_ids)
    for _ in range(n):
        cache = KVCache(net.config, 1, net.device)
        with torch.no_grad():
            token = int(net.head(net.encode(torch.tensor([seq]), cache))[0, -1].argmax())
        if token in eos:
            break
        seq.append(token)
    return seq[len(prompt):]


def test_cached_decoding_equals_recomputing_everything(net):
    """The tiny preset's sliding window is 64: 70 prompt tokens + 30 new ones cross it."""
    gen = torch.Generator().manual_seed(0)
    for length in (1, 9, 70):
        prompt = torch.randint(3, 512, (length,), generator=gen).tolist()
        result = ar_generate(net, prompt, 30)
        expected = naive_greedy(net, prompt, 30)
        assert result.token_ids == [expected]
        assert result.forwards == len(expected) + (len(expected) < 30)  # + the pass that produced a stop id
        calls = []
        assert ar_generate(net, prompt, 30, on_token=lambda: calls.append(1)).token_ids == [expected]
        assert len(calls) == result.forwards  # once per pass: what the benchmark's token clock counts


def test_batch_of_different_lengths_equals_each_alone(net):
    a, b = [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [2, 300, 301]
    both = ar_generate(net, [a, b], 20)
    assert both.token_ids == [ar_generate(net, a, 20).token_ids[0], ar_generate(net, b, 20).token_ids[0]]
    stop = [both.token_ids[1][5]]  # row b stops early; row a runs on beside it
    early = ar_generate(net, [a, b], 20, stop_ids=stop)
    assert early.token_ids == [ar_generate(net, a, 20, stop_ids=stop).token_ids[0],
                               ar_generate(net, b, 20, stop_ids=stop).token_ids[0]]
    assert len(early.token_ids[1]) <= 5 < len(early.token_ids[0])


def test_length_cap_and_stop_ids(net):
    prompt = [2, 7, 8, 9]
    for n in (1, 5, 17):
        result = ar_generate(net, prompt, n, stop_ids=[])
        assert len(result.token_ids[0]) == n and result.forwards == n
    free = ar_generate(net, prompt, 12, stop_ids=[]).token_ids[0]
    cut = ar_generate(net, prompt, 12, stop_ids=[free[4]]).token_ids[0]
    assert cut == free[:free.index(free[4])]


def test_sampling_is_seed_deterministic(net):
    prompt = [[2, 11, 12], [2, 13]]
    a = ar_generate(net, prompt, 16, temperature=1.5, seed=7, stop_ids=[])
    b = ar_generate(net, prompt, 16, temperature=1.5, seed=7, stop_ids=[])
    c = ar_generate(net, prompt, 16, temperature=1.5, seed=8, stop_ids=[])
    assert a.token_ids == b.token_ids != c.token_ids
    assert all(len(r) == 16 for r in a.token_ids)


def test_bad_inputs_are_named(net):
    with pytest.raises(ValueError, match="max_new_tokens"):
        ar_generate(net, [2, 3], 0)
    with pytest.raises(ValueError, match="empty prompt"):
        ar_generate(net, [[2], []], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ar_generate(net, [2, 512], 4)
    with pytest.raises(ValueError, match="temperature"):
        ar_generate(net, [2], 4, temperature=-1)
    with pytest.raises(ValueError, match="context"):
        ar_generate(net, [2], 5000)


def _recording_capture(calls):
    """A stand-in for CUDA graph capture on the CPU with its semantics: the warm-up pass runs (and writes the cache
    once), capturing records without running, and each replay runs the pass again into the same output tensor."""
    def capture(fn, device):
        calls.append("capture")
        first = fn()
        out = torch.empty_like(first)

        def replay():
            calls.append("replay")
            out.copy_(fn())
        return replay, out, first
    return capture


def test_graph_replayed_token_steps_give_the_eager_tokens(net, monkeypatch):
    """One capture serves every token step of a call; rows that stop early and the length cap work as eagerly."""
    from dgemma.engine import ar, graphs

    prompts = [[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [2, 300, 301]]
    eager = ar_generate(net, prompts, 20)
    stop = [eager.token_ids[1][5]]
    eager_stop = ar_generate(net, prompts, 20, stop_ids=stop)
    calls = []
    monkeypatch.setattr(graphs, "use_graphs", lambda device: True)
    monkeypatch.setattr(ar.TokenStep, "capture", staticmethod(_recording_capture(calls)))
    replayed = ar_generate(net, prompts, 20)
    assert replayed.token_ids == eager.token_ids and replayed.forwards == eager.forwards == 20
    assert calls.count("capture") == 1 and calls.count("replay") == 18  # the prefill, the warm-up, 18 replays
    assert ar_generate(net, prompts, 20, stop_ids=stop).token_ids == eager_stop.token_ids


def test_failed_token_step_capture_decodes_eagerly(net, monkeypatch):
    from dgemma.engine import ar, graphs

    def broken(fn, device):
        raise RuntimeError("capture not supported here")

    expected = ar_generate(net, [2, 7, 8], 12).token_ids
    monkeypatch.setattr(graphs, "use_graphs", lambda device: True)
    monkeypatch.setattr(ar.TokenStep, "capture", staticmethod(broken))
    with pytest.warns(RuntimeWarning, match="token step failed"):
        assert ar_generate(net, [2, 7, 8], 12).token_ids == expected


@pytest.mark.parametrize("positions_at_once", [None, 3])
def test_ar_score_sums_the_log_probabilities_of_each_continuation(net, monkeypatch, positions_at_once):
    """Against re-encoding each prefix alone, token by token; rows of different lengths (one empty) in one batch,
    crossing the tiny preset's 64-token sliding window; the head over all positions at once or three at a time."""
    if positions_at_once:
        monkeypatch.setattr(dgemma.engine.ar, "_SCORE_ENTRIES", positions_at_once * net.config.vocab_size)
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 500, (60,), generator=gen).tolist()
    conts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (9, 3, 0, 12)]
    expected = []
    for cont in conts:
        total, seq = 0.0, list(prompt)
        for token in cont:
            with torch.no_grad():
                logits = net.head(net.encode(torch.tensor([seq]), KVCache(net.config, 1, net.device)))[0, -1]
            total += float(torch.log_softmax(logits, -1)[token])
            seq.append(token)
        expected.append(total)
    scores = ar_score(net, prompt, conts)
    assert scores.shape == (4,) and scores[2] == 0
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="at least one continuation"):
        ar_score(net, prompt, [])
    with pytest.raises(ValueError, match="continuation token id 512 is outside the vocabulary"):
        ar_score(net, prompt, [[5], [net.config.vocab_size]])


def test_fit_scores_rank_an_empty_text_last(net):
    prompt, texts = [5, 6, 7], [[], [9, 10], [11]]
    scores = fit_scores(net, prompt, texts)
    assert scores[0] == float("-inf") and torch.equal(scores[1:], ar_score(net, prompt, texts[1:]))
    assert int(fit_scores(net, prompt, [[], []]).argmax()) == 0  # nothing to choose by: the first
