"""The request queue between the HTTP server and the synchronous engine: batching, commits, drafts, cancellation.

Owns: a bounded queue of `Job`s, one worker thread that runs `Model.generate` on batches of compatible jobs, the
per-canvas commit of each row (a canvas is committed when the next one starts or generation returns; the ids each row
gets are exactly the engine's `token_ids`: cut at the job's `max_new_tokens`, nothing from the first EOS on, no pad),
per-step draft events for jobs that ask, cancellation (a batch stops at its next step once every job in it is
cancelled or finished), and handing events to each job's asyncio loop.
Batching rule: jobs without a seed and without a starting canvas share a batch when their diffusion settings are
equal (a seeded job runs alone, so its output never depends on what else was queued). A one-row batch whose prompt
extends a recent one-row prompt (the next turn of a chat) encodes only the new tokens (`PrefixCache`).
Must not: parse HTTP, tokenize text or format responses (app.py does), or change the engine's arithmetic.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass

from ..api import Model
from ..engine.generate import StepEvent
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


@dataclass
class End:
    finish_reasons: list[str]  # per row: "stop" (EOS) or "length"


@dataclass
class Failed:
    error: BaseException


class Job:
    """Prompt rows that are generated together and answered together (one HTTP request).

    `canvas`/`pinned` ([C] lists) start the first canvas from given ids with pinned positions; such a job is `raw`:
    it runs alone for one canvas and its Commit holds the whole final draft. Events go to `events` on `loop`."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, diffusion: Diffusion = Diffusion(), *,
                 seed: int | None = None, canvas: list[int] | None = None, pinned: list[bool] | None = None,
                 drafts: bool = False, loop: asyncio.AbstractEventLoop | None = None):
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.diffusion = diffusion
        self.seed = seed
        self.canvas, self.pinned = canvas, pinned
        self.drafts = drafts
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.ended = False  # set by the worker once End or Failed was sent

    @property
    def raw(self) -> bool:
        return self.canvas is not None

    @property
    def batchable(self) -> bool:
        return self.seed is None and not self.raw

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


class _Batch:
    """Bookkeeping for one `Model.generate` call over the rows of several jobs."""

    def __init__(self, model: Model, jobs: list[Job], prefix: PrefixCache | None = None):
        self.model, self.jobs, self.prefix = model, jobs, prefix
        self.spans: list[tuple[int, int]] = []  # job -> its rows [start, stop)
        for job in jobs:
            start = self.spans[-1][1] if self.spans else 0
            self.spans.append((start, start + len(job.prompts)))
        rows = self.spans[-1][1]
        self.canvas_index = 0
        self.draft: list[list[int]] | None = None  # [B, C] latest draft of the current canvas
        self.settled_at: list[int | None] = [None] * rows
        self.last_step = 0
        self.eos_seen = [False] * rows
        self.eos = set(model.config.eos_token_ids)
        self.pad = model.config.pad_token_id

    def on_step(self, event: StepEvent) -> None:
        if event.canvas_index != self.canvas_index:
            self.commit()
            self.canvas_index = event.canvas_index
        self.draft = event.draft.tolist()
        done = event.done.tolist()
        self.last_step = event.step
        for row, settled in enumerate(done):
            if settled and self.settled_at[row] is None:
                self.settled_at[row] = event.step
        accepted = event.accepted.tolist() if any(j.drafts and not j.cancelled for j in self.jobs) else None
        for job, (a, b) in zip(self.jobs, self.spans):
            if job.drafts and not job.cancelled and not job.ended:
                job.emit(Draft(event.canvas_index, event.step, self.draft[a:b], accepted[a:b], done[a:b]))
        if all(job.cancelled or job.ended for job in self.jobs):
            raise _Stop

    def commit(self) -> None:
        """Hand the current canvas's final draft to every live job; end jobs that reached their length or EOS."""
        c = self.model.config.canvas_length
        steps = [s if s is not None else self.last_step for s in self.settled_at]
        for job, (a, b) in zip(self.jobs, self.spans):
            if job.ended or job.cancelled or self.draft is None:
                continue
            if job.raw:
                job.emit(Commit(self.canvas_index, self.draft[a:b], steps[a:b]))
                job.emit(End(["length"] * (b - a)))
                continue
            room = max(0, job.max_new_tokens - self.canvas_index * c)
            tokens = []
            for row in range(a, b):
                kept = []
                if not self.eos_seen[row]:
                    for t in self.draft[row][:room]:
                        if t in self.eos:
                            self.eos_seen[row] = True
                            break
                        if t != self.pad:
                            kept.append(t)
                tokens.append(kept)
            job.emit(Commit(self.canvas_index, tokens, steps[a:b]))
            if room <= c or all(self.eos_seen[a:b]):
                job.emit(End(["stop" if self.eos_seen[row] else "length" for row in range(a, b)]))
        self.settled_at = [None] * len(self.settled_at)

    def run(self) -> None:
        first = self.jobs[0]
        d = first.diffusion
        kw = {"max_new_tokens": max(j.max_new_tokens for j in self.jobs), "max_denoising_steps": d.max_denoising_steps,
              "entropy_bound": d.entropy_bound, "t_min": d.t_min, "t_max": d.t_max, "seed": first.seed}
        if first.raw:
            kw.update(canvas=first.canvas, pinned=first.pinned)
        prompts = [p for job in self.jobs for p in job.prompts]
        try:
            self.model.generate(prompts, on_step=self.on_step, prefix_cache=self.prefix, **kw)
            self.commit()
        except _Stop:
            pass
        except Exception as err:  # noqa: BLE001 - every job of the batch is told, the worker goes on
            for job in self.jobs:
                if not job.ended:
                    job.emit(Failed(err))
        for job, (a, b) in zip(self.jobs, self.spans):  # cancelled jobs
            if not job.ended:
                job.emit(End(["stop" if self.eos_seen[r] else "length" for r in range(a, b)]))


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
        self.batches = 0  # engine calls made
        self.prefix = PrefixCache()  # encoder caches of recent one-row prompts (chat turns extend them)
        self._thread = threading.Thread(target=self._work, name="dgemma-scheduler", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running_rows(self) -> int:
        return sum(len(j.prompts) for j in self._running)

    def submit(self, job: Job) -> None:
        if len(job.prompts) > self.max_batch:
            raise ValueError(f"a request may have at most {self.max_batch} rows (prompts x n), got {len(job.prompts)}")
        with self._cond:
            if self._closing:
                raise RuntimeError("the scheduler is shut down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
            self._queue.append(job)
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every job, stop the worker after its current step, wait for it up to `timeout` seconds."""
        with self._cond:
            self._closing = True
            for job in [*self._queue, *self._running]:
                job.cancel()
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> list[Job]:
        """The oldest live job and, when it is batchable, later batchable jobs with equal settings that fit."""
        while self._queue and self._queue[0].cancelled:
            self._queue.popleft().emit(End([]))
        if not self._queue:
            return []
        first = self._queue.popleft()
        batch, rows = [first], len(first.prompts)
        if first.batchable:
            for job in list(self._queue):
                if job.cancelled or not job.batchable or job.diffusion != first.diffusion:
                    continue
                if rows + len(job.prompts) > self.max_batch:
                    break
                self._queue.remove(job)
                batch.append(job)
                rows += len(job.prompts)
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait(timeout=1.0)
                if self._closing:
                    for job in self._queue:
                        job.emit(Failed(RuntimeError("the server is shutting down")))
                    self._queue.clear()
                    return
                self._running = self._take()
            if self._running:
                _Batch(self.model, self._running, self.prefix).run()
                self.batches += 1
            self._running = []
