"""The request queue between the HTTP server and the synchronous engine: continuous batching, commits, drafts,
cancellation.

Owns: a bounded queue of `Job`s, one worker thread that runs one `CanvasLoop` at a time (a run), the per-canvas commit
of each row (the ids each row gets are exactly the engine's `token_ids`: cut at the job's `max_new_tokens`, nothing
from the first EOS on, no pad), per-step draft events for jobs that ask, cancellation (a cancelled job leaves at the
next canvas boundary; a canvas stops at its next step once every job in the run is cancelled or finished), and
handing events to each job's asyncio loop.
Batching rule (continuous, at canvas boundaries): waiting jobs join the running run before each canvas when their
diffusion settings equal the run's, their rows fit `max_batch`, and each of their rows can have its own generator
(`Job.joinable`); a job's rows leave once all of them finished, freeing their slots. A job that cannot join waits
for the run to end, and the jobs behind it wait with it (first come, first served). A seeded one-row job gets what it would get alone. A one-row admission whose prompt extends a
recent one-row prompt (the next turn of a chat) encodes only the new tokens (`PrefixCache`).
Must not: parse HTTP, tokenize text or format responses (app.py does), or change the engine's arithmetic."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from ..api import Model
from ..engine.generate import CanvasLoop, Row, StepEvent
from ..engine.prefix import PrefixCache


class QueueFull(Exception):
    """The queue holds `max_queue` waiting jobs already."""


class _Stop(Exception):
    """Raised from on_step to end a batch whose jobs are all cancelled or finished."""


@dataclass(frozen=True)
class Diffusion:
    """Per-request sampler overrides (None = the checkpoint's default). Jobs with equal values may share a batch."""

    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None


@dataclass
class Draft:
    """One denoising step of the job's rows."""

    canvas: int  # 0-based canvas number
    step: int  # 1-based step within the canvas
    tokens: list[list[int]]  # [rows, C] argmax draft
    accepted: list[list[bool]]  # [rows, C] accepted at this step
    done: list[bool]  # [rows] canvas settled


@dataclass
class Commit:
    """A committed canvas: the new ids of each row (raw jobs: the whole final canvas)."""

    canvas: int
    tokens: list[list[int]]  # per row; empty for rows that ended before this canvas
    steps: list[int]  # per row: denoising steps this canvas took
    scores: list[float] | None = None  # per row: the raw job's `score` of its final draft
    finished: list[bool] | None = None  # per row: whether the row has ended (EOS or max_new_tokens) by this canvas


@dataclass
class End:
    finish_reasons: list[str]  # per row: "stop" (EOS) or "length"


@dataclass
class Failed:
    error: BaseException


class Job:
    """Prompt rows that are generated together and answered together (one HTTP request).

    `canvas`/`pinned` ([C] lists) start the first canvas from given ids with pinned positions; such a job is `raw`:
    it runs alone for one canvas and its Commit holds the whole final draft, and with `score` (the rows' drafts ->
    one float per row, run on the worker thread, where the model is free) each draft's score. Events go to
    `events` on `loop`."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, diffusion: Diffusion = Diffusion(), *,
                 seed: int | None = None, canvas: list[int] | None = None, pinned: list[bool] | None = None,
                 drafts: bool = False, score: Callable[[list[list[int]]], list[float]] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.diffusion = diffusion
        self.seed = seed
        self.canvas, self.pinned = canvas, pinned
        self.drafts = drafts
        self.score = score
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.ended = False  # set by the worker once End or Failed was sent

    @property
    def raw(self) -> bool:
        return self.canvas is not None

    @property
    def joinable(self) -> bool:
        """Whether the job's rows may share a run with other jobs': each row then has its own generator, which for
        a seeded one-row job draws what `Model.generate(seed=...)` draws. A seeded job of several rows draws from
        one generator for all of them (as Model.generate does) and a raw job pins its canvas: those run alone."""
        return not self.raw and (self.seed is None or len(self.prompts) == 1)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop caring about this job: no more events are useful; its batch stops once no job in it needs more."""
        self._cancelled.set()

    def emit(self, event) -> None:
        if isinstance(event, (End, Failed)):
            self.ended = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()


class _Run:
    """One `CanvasLoop` and the jobs whose rows are in it. An open run (rows with their own generators) takes new
    jobs at canvas boundaries; a job's rows leave together once all of them finished or the job was cancelled."""

    def __init__(self, model: Model, first: Job, prefix: PrefixCache):
        self.model, self.diffusion, self.raw = model, first.diffusion, first.raw
        d = first.diffusion
        settings = model.settings.replace(max_new_tokens=first.max_new_tokens,
                                          max_denoising_steps=d.max_denoising_steps, entropy_bound=d.entropy_bound,
                                          t_min=d.t_min, t_max=d.t_max)
        self.open = first.joinable
        self.loop = CanvasLoop(model.net, settings, generator=None if self.open else model.generator(first.seed),
                               per_row=self.open, on_step=self._on_step, prefix_cache=prefix)
        self.jobs: list[Job] = []
        self._rows: dict[int, list[Row]] = {}  # id(job) -> its rows
        self._canvas: dict[int, int] = {}  # id(job) -> canvases committed to it
        self.add(first)

    @property
    def rows(self) -> int:
        return sum(len(self._rows[id(j)]) for j in self.jobs)

    def accepts(self, job: Job) -> bool:
        return self.open and job.joinable and job.diffusion == self.diffusion

    def add(self, job: Job) -> None:
        n = len(job.prompts)
        generators = None
        if self.open:  # a seeded row draws what Model.generate(seed=...) draws for it alone
            seeds = [job.seed] if job.seed is not None else torch.randint(0, 2**62, (n,)).tolist()
            generators = [self.model.generator(s) for s in seeds]
        self._rows[id(job)] = self.loop.add(job.prompts, job.max_new_tokens, generators=generators, tags=[job] * n)
        self._canvas[id(job)] = 0
        self.jobs.append(job)

    def _on_step(self, event: StepEvent) -> None:
        live = [j for j in self.jobs if not (j.cancelled or j.ended)]
        if not live:
            raise _Stop
        watching = [j for j in live if j.drafts]
        if watching:
            at = {id(r): i for i, r in enumerate(self.loop.rows)}
            draft, accepted, done = event.draft.tolist(), event.accepted.tolist(), event.done.tolist()
            for job in watching:
                idx = [at[id(r)] for r in self._rows[id(job)]]
                job.emit(Draft(self._canvas[id(job)], event.step, [draft[i] for i in idx],
                               [accepted[i] for i in idx], [done[i] for i in idx]))

    def step(self) -> None:
        """One canvas for every row: commits to each live job, End to those that are through, then they leave."""
        canvas = pinned = None
        if self.raw and not self.loop.canvases:
            first = self.jobs[0]
            canvas = self.model.canvas_ids(first.canvas, len(first.prompts), "canvas")
            pinned = self.model.canvas_ids(first.pinned, len(first.prompts), "pinned", torch.bool)
        stopped = True  # the canvas did not complete: every job leaves
        try:
            commits = {id(c.row): c for c in self.loop.step(canvas, pinned)}
            stopped = False
        except _Stop:
            pass
        except Exception as err:  # noqa: BLE001 - every job of the run is told, the worker goes on
            for job in self.jobs:
                if not job.ended:
                    job.emit(Failed(err))
        for job in self.jobs:
            if job.ended or job.cancelled or stopped:
                continue
            rows = self._rows[id(job)]
            got = [commits.get(id(r)) for r in rows]
            steps = [c.steps if c else 0 for c in got]
            if job.raw:
                drafts = [c.draft for c in got]
                try:
                    scores = job.score(drafts) if job.score is not None else None
                except Exception as err:  # noqa: BLE001 - the job is told, the worker goes on
                    job.emit(Failed(err))
                    continue
                job.emit(Commit(0, drafts, steps, scores))
                job.emit(End(["length"] * len(rows)))
                continue
            job.emit(Commit(self._canvas[id(job)], [c.token_ids if c else [] for c in got], steps,
                            finished=[r.finished for r in rows]))
            self._canvas[id(job)] += 1
            if all(r.finished for r in rows):
                job.emit(End([r.finish_reason for r in rows]))
        for job in [j for j in self.jobs if j.ended or j.cancelled or stopped]:
            if not job.ended:  # cancelled, or the run stopped
                job.emit(End([r.finish_reason or "length" for r in self._rows[id(job)]]))
            if not stopped:
                self.loop.release(self._rows[id(job)])
            self.jobs.remove(job)
            del self._rows[id(job)], self._canvas[id(job)]


class Scheduler:
    """A bounded FIFO of jobs and the one worker thread that runs them on `model`.

    `max_queue`: waiting jobs beyond which `submit` raises QueueFull; `max_batch`: rows per engine call."""

    def __init__(self, model: Model, *, max_queue: int = 64, max_batch: int = 32):
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be >= 1")
        self.model, self.max_queue, self.max_batch = model, max_queue, max_batch
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._running: list[Job] = []
        self.batches = 0  # runs completed (a run takes jobs in until it empties)
        self.requests = 0  # jobs accepted
        self.prefix = PrefixCache()  # encoder caches of recent one-row prompts (chat turns extend them)
        self._thread = threading.Thread(target=self._work, name="dgemma-scheduler", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs waiting to run (cancelled ones, which leave at the next admission, not counted)."""
        with self._cond:  # the worker changes the queue meanwhile
            return sum(not j.cancelled for j in self._queue)

    @property
    def running_rows(self) -> int:
        return sum(len(j.prompts) for j in self._running)

    def submit(self, job: Job) -> None:
        if len(job.prompts) > self.max_batch:
            raise ValueError(f"a request may have at most {self.max_batch} rows (prompts x n), got {len(job.prompts)}")
        with self._cond:
            if self._closing:
                raise RuntimeError("the scheduler is shut down")
            if self.waiting >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
            self._queue.append(job)
            self.requests += 1
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every job, stop the worker after its current step, wait for it up to `timeout` seconds."""
        with self._cond:
            self._closing = True
            for job in [*self._queue, *self._running]:
                job.cancel()
            self._cond.notify()
        self._thread.join(timeout)

    def _admit(self, run: _Run | None) -> _Run | None:
        """Drop cancelled jobs; start a run with the oldest job when there is none; then move waiting jobs into it,
        oldest first, while the run accepts them and their rows fit. The first that cannot join stops the admissions,
        so the run drains and that job goes next: first come, first served, whatever keeps arriving."""
        for job in [j for j in self._queue if j.cancelled]:
            self._queue.remove(job)
            job.emit(End([]))
        if run is None:
            if not self._queue:
                return None
            run = _Run(self.model, self._queue.popleft(), self.prefix)
        for job in list(self._queue):
            if not run.accepts(job) or run.rows + len(job.prompts) > self.max_batch:
                break
            self._queue.remove(job)
            run.add(job)
        return run

    def _work(self) -> None:
        run: _Run | None = None
        while True:
            with self._cond:
                while not self._queue and run is None and not self._closing:
                    self._cond.wait(timeout=1.0)
                if self._closing:
                    for job in self._queue:
                        job.emit(Failed(RuntimeError("the server is shutting down")))
                    self._queue.clear()
                    if run is not None:
                        run.step()  # every job is cancelled: they all get End and leave
                    return
                run = self._admit(run)
                self._running = [] if run is None else list(run.jobs)
            if run is None:
                continue
            run.step()
            if not run.jobs:
                self.batches += 1
                run = None
            self._running = [] if run is None else list(run.jobs)
