"""Continuous batching: rows with their own generators join a running CanvasLoop at canvas boundaries and leave when
they finish; each row's tokens equal a run of that row alone with the same seed. Token equality is checked in float64,
where the float rounding that padding brings into attention sums cannot flip a near-tie; float32 logits are checked
to agree within 1e-5."""

import asyncio
import dataclasses

import pytest
import torch

import dgemma
from dgemma.engine.cache import KVCache
from dgemma.engine.generate import CanvasLoop

# A generous confidence and no stability requirement: rows settle at different steps, so a settled row waits for the
# others (and must not draw meanwhile, or its next canvas would differ from its run alone).
SETTINGS = dict(max_denoising_steps=6, entropy_bound=0.5, confidence_threshold=1.5, stability_threshold=0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _alone(model, prompt, max_new, seed):
    return model.generate([prompt], max_new_tokens=max_new, seed=seed, **SETTINGS)


def _without_eos(model):
    """Rows of a random tiny model often hit an EOS in their first canvas; these must live for several."""
    model.net.config = dataclasses.replace(model.net.config, eos_token_ids=())
    return model


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=_gen(seed)).tolist()


def test_per_row_draws_of_one_row_equal_the_batch_draws(tiny):
    """A one-row loop with per-row generators draws what generate's shared generator draws."""
    model = dgemma.load(tiny[0])
    prompt = _prompt(9, 0)
    loop = CanvasLoop(model.net, model.settings.replace(max_new_tokens=40, **SETTINGS), per_row=True)
    (row,) = loop.add([prompt], 40, generators=[_gen(5)])
    while not row.finished:
        loop.step()
    solo = _alone(model, prompt, 40, 5)
    assert row.token_ids == solo.token_ids[0] and row.steps == solo.steps[0]
    assert row.finish_reason == solo.finish_reasons[0]


@pytest.mark.parametrize("config", ["ssf", "ssfsf"])
def test_rows_that_join_and_leave_get_their_solo_tokens(ckpt_dir, config):
    """Row A starts alone; B (a prompt longer than A's cache, so A is padded) joins at canvas 2; C (short, padded
    itself) joins at canvas 3 after A left; every row's tokens, steps and finish equal its own run alone."""
    from conftest import reference_checkpoint

    path, _ = reference_checkpoint(ckpt_dir, config, seed=3)
    model = _without_eos(dgemma.load(path, dtype=torch.float64))
    settings = model.settings.replace(**SETTINGS)
    specs = {"a": (_prompt(5, 1), 32, 11), "b": (_prompt(30, 2), 48, 12), "c": (_prompt(3, 3), 40, 13)}
    joins = {0: "a", 1: "b", 2: "c"}  # canvas index at which each row joins
    loop = CanvasLoop(model.net, settings, per_row=True)
    rows, lengths, done = {}, [], []
    for canvas in range(12):
        if canvas in joins:
            name = joins[canvas]
            prompt, max_new, seed = specs[name]
            (rows[name],) = loop.add([prompt], max_new, generators=[_gen(seed)], tags=[name])
        if not loop.rows and not loop._joining:
            break
        loop.step()
        lengths.append(loop._cache.length)
        done += [r.tag for r in loop.release()]
    assert sorted(done) == ["a", "b", "c"]
    assert [len(rows[n].steps) for n in "abc"] == [2, 3, 3]  # 32, 48 and 40 tokens over 16-token canvases
    assert len({s for n in "abc" for s in rows[n].steps}) > 1  # rows settled at different steps
    for name, (prompt, max_new, seed) in specs.items():
        solo = _alone(model, prompt, max_new, seed)
        row = rows[name]
        assert (row.token_ids, row.steps, row.finish_reason) == \
               (solo.token_ids[0], solo.steps[0], solo.finish_reasons[0]), name
    # canvas 2: A's 5 + 16 tokens padded to B's 30; canvas 3: A left, C's 3 padded to 30 + 16; B and C go on alone
    assert lengths[:4] == [5, 30, 46, 62]


def test_rows_added_together_get_their_solo_tokens(ckpt_dir):
    """Prompts of different lengths added in one call share one left-padded encoder pass; each row's positions
    still start at 0, as alone, so in float64 every row gets its solo tokens."""
    from conftest import reference_checkpoint

    path, _ = reference_checkpoint(ckpt_dir, "ssf", seed=3)
    model = _without_eos(dgemma.load(path, dtype=torch.float64))
    prompts, seeds = [_prompt(30, 21), _prompt(4, 22), _prompt(11, 23)], [31, 32, 33]
    loop = CanvasLoop(model.net, model.settings.replace(**SETTINGS), per_row=True)
    rows = loop.add(prompts, 32, generators=[_gen(s) for s in seeds])
    while not all(r.finished for r in rows):
        loop.step()
    for row, prompt, seed in zip(rows, prompts, seeds):
        assert row.token_ids == _alone(model, prompt, 32, seed).token_ids[0]


def test_rows_released_before_they_join_never_run_and_generators_are_required(tiny):
    model = dgemma.load(tiny[0])
    loop = CanvasLoop(model.net, model.settings.replace(**SETTINGS), per_row=True)
    with pytest.raises(ValueError, match="one torch.Generator per prompt"):
        loop.add([[5, 6]], 16, generators=[None])  # None would mean a settled row that draws nothing
    kept, dropped = loop.add([[5, 6], [7, 8]], 16, generators=[_gen(1), _gen(2)])
    assert loop.release([dropped]) == [dropped]
    loop.step()
    assert loop.rows == [kept] and not dropped.token_ids and kept.token_ids


def test_leaving_rows_free_their_leading_slots(tiny):
    """When the row with the oldest tokens leaves, slots that are padding in every remaining row are dropped."""
    model = _without_eos(dgemma.load(tiny[0]))
    loop = CanvasLoop(model.net, model.settings.replace(**SETTINGS), per_row=True)
    (long_row,) = loop.add([_prompt(40, 4)], 16, generators=[_gen(1)])
    loop.step()
    (short_row,) = loop.add([_prompt(4, 5)], 64, generators=[_gen(2)])
    loop.step()  # encodes long_row's canvas, then joins short_row padded to 56 slots
    assert long_row.finished and loop._cache.length == 40 + 16
    loop.release()
    loop.step()  # short_row alone: its 4 prompt tokens + 16 committed, and nothing else
    assert loop._cache.length == 4 + 16
    assert loop._cache.offset.tolist() == [0]  # position = slot again once its padding is gone


def test_joined_cache_gives_each_row_its_own_logits(tiny):
    """Decoder logits of rows in a concatenated, then selected cache equal those of each row's own cache."""
    model = dgemma.load(tiny[0])
    net, c = model.net, model.config.canvas_length
    prompts = [_prompt(11, 6), _prompt(3, 7), _prompt(25, 8)]
    canvases = [torch.randint(0, 128, (1, c), generator=_gen(9 + i)) for i in range(3)]
    solo = []
    with torch.no_grad():
        caches = []
        for p, canvas in zip(prompts, canvases):
            cache = KVCache(model.config, 1)
            net.encode(torch.tensor([p]), cache)
            caches.append(cache)
            solo.append(net.decode(canvas, cache))
        joined = KVCache.concat(KVCache.concat(caches[0], caches[1]), caches[2])
        assert joined.length == 25 and joined.offset.tolist() == [-14, -22, 0]
        out = net.decode(torch.cat(canvases), joined)
        for i in range(3):
            torch.testing.assert_close(out[i:i + 1], solo[i], rtol=1e-5, atol=1e-5)
        picked = joined.select(torch.tensor([0, 1]))  # row 2 leaves: 11 slots of padding in both rows go
        assert picked.length == 11 and picked.offset.tolist() == [0, -8]
        out = net.decode(torch.cat(canvases[:2]), picked)
        for i in range(2):
            torch.testing.assert_close(out[i:i + 1], solo[i], rtol=1e-5, atol=1e-5)


def test_a_shared_generator_loop_refuses_late_rows(tiny):
    model = dgemma.load(tiny[0])
    loop = CanvasLoop(model.net, model.settings.replace(**SETTINGS))
    loop.add([[5, 6]], 32)
    loop.step()
    with pytest.raises(ValueError, match="own generator"):
        loop.add([[7, 8]], 32)
    with pytest.raises(ValueError, match="one torch.Generator per prompt"):
        CanvasLoop(model.net, model.settings, per_row=True).add([[5]], 16)


def test_scheduler_admits_a_waiting_request_into_the_running_batch(tiny):
    """A seeded request submitted while another runs joins its batch at the next canvas boundary, ends first and
    leaves; both get exactly what each gets alone, and the whole took one engine run."""
    from dgemma.serve.scheduler import Commit, Diffusion, End, Job, Scheduler

    model = _without_eos(dgemma.load(tiny[0], dtype=torch.float64))
    model.settings = model.settings.replace(confidence_threshold=1.5, stability_threshold=0)  # rows settle early
    d = Diffusion(max_denoising_steps=6)
    specs = {"long": (_prompt(6, 10), 160, 1), "short": (_prompt(20, 11), 32, 2)}

    async def collect(job, log, name):
        tokens = []
        while True:
            event = await job.events.get()
            log.append((name, type(event).__name__))
            if isinstance(event, Commit):
                tokens += event.tokens[0]
            if isinstance(event, End):
                return tokens

    async def main():
        scheduler = Scheduler(model, max_batch=4)
        log: list = []
        try:
            prompt, n, seed = specs["long"]
            long = Job([prompt], n, d, seed=seed)
            scheduler.submit(long)
            first = await long.events.get()
            assert isinstance(first, Commit) and first.canvas == 0
            prompt, n, seed = specs["short"]
            short = Job([prompt], n, d, seed=seed)
            scheduler.submit(short)
            short_task = asyncio.create_task(collect(short, log, "short"))
            long_tokens = first.tokens[0] + await collect(long, log, "long")
            short_tokens = await short_task
        finally:
            scheduler.close()  # joins the worker, which counts the run once its last job left
        return long_tokens, short_tokens, log, scheduler.batches

    long_tokens, short_tokens, log, runs = asyncio.run(main())
    assert log.index(("short", "End")) < log.index(("long", "End"))  # it joined and left while the long one ran
    assert runs == 1
    for name, tokens in (("long", long_tokens), ("short", short_tokens)):
        prompt, n, seed = specs[name]
        assert tokens == model.generate([prompt], max_new_tokens=n, max_denoising_steps=6, seed=seed).token_ids[0]


def test_a_request_that_cannot_join_goes_next_and_cancelled_ones_free_the_queue(tiny):
    """First come, first served: a request with other sampler settings waits for the run to end, and the
    requests behind it wait with it instead of joining the run ahead of it. Cancelled requests leave the queue
    wherever they are in it."""
    from dgemma.serve.scheduler import Commit, Diffusion, End, Job, QueueFull, Scheduler

    model = _without_eos(dgemma.load(tiny[0]))
    ends: list[str] = []

    async def finish(job, name):
        while not isinstance(await job.events.get(), End):
            pass
        ends.append(name)

    async def main():
        scheduler = Scheduler(model, max_queue=4, max_batch=8)
        try:
            long = Job([_prompt(6, 1)], 2000, Diffusion(max_denoising_steps=2), seed=1)  # runs through the test
            scheduler.submit(long)
            assert isinstance(await long.events.get(), Commit)  # the run is going
            odd = Job([_prompt(6, 2)], 16, Diffusion(max_denoising_steps=3), seed=2)  # other settings
            same = Job([_prompt(6, 3)], 16, Diffusion(max_denoising_steps=2), seed=3)  # could join the run
            gone = [Job([_prompt(6, 4 + i)], 16, Diffusion(max_denoising_steps=2), seed=4) for i in range(2)]
            for job in (odd, same, *gone):
                scheduler.submit(job)
            with pytest.raises(QueueFull):
                scheduler.submit(Job([[5]], 16))
            for job in gone:  # two clients hang up: their places are free at once
                job.cancel()
            assert scheduler.waiting == 2 and not long.ended  # the run is still going: the order means something
            scheduler.submit(Job([_prompt(6, 9)], 16, Diffusion(max_denoising_steps=3), seed=9))
            await asyncio.gather(finish(long, "long"), finish(odd, "odd"), finish(same, "same"))
        finally:
            scheduler.close()
        return scheduler.batches

    runs = asyncio.run(main())
    assert ends == ["long", "odd", "same"] and runs >= 3


def test_joined_rows_through_graph_replays_give_the_eager_tokens(tiny, monkeypatch):
    """The graphs' static cache carries the rows' offsets: replayed steps over a joined cache match eager ones."""
    from dgemma.engine import graphs
    from test_engine import _replaying_capture

    model = _without_eos(dgemma.load(tiny[0], dtype=torch.float64))
    settings = model.settings.replace(**SETTINGS)

    def run():
        loop = CanvasLoop(model.net, settings, per_row=True)
        first, = loop.add([_prompt(5, 1)], 48, generators=[_gen(1)])
        loop.step()
        second, = loop.add([_prompt(30, 2)], 32, generators=[_gen(2)])
        while not (first.finished and second.finished):
            loop.step()
            loop.release()
        return first.token_ids, second.token_ids

    eager = run()
    calls = []
    monkeypatch.setattr(graphs, "use_graphs", lambda device: True)
    monkeypatch.setattr(graphs.CanvasDecoder, "capture", staticmethod(_replaying_capture(calls, True)))
    assert run() == eager
    assert calls.count("capture") >= 4 and "replay" in calls
