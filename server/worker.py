"""The engine behind the service: one worker thread runs requests from a bounded queue, one at a time
(the single-request engine; the batched engine replaces this loop), and streams their steps back.

A request is a ``Job``: validated before it is queued (bad input never waits), refused with
``OverloadedError`` when the queue is full or the server is draining, stopped between two target passes
when it is aborted, cancelled by its client or past its deadline. A failing request fails alone: the
exception goes to its caller and the worker moves on. KV caches belong to the running request and are
released when it ends, however it ends.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from spruce.config import SamplingParams, SpeculationConfig
from spruce.engine import DEFAULT, Engine, GenerationOutput, StreamEvent
from spruce.errors import InvalidRequestError, OverloadedError
from spruce.server.metrics import Metrics
from spruce.stats import SpecStats
from spruce.stopping import FINISH_ABORT

log = logging.getLogger(__name__)

# what a job's event queue carries at the end when the request failed
_FAILED = object()


@dataclass
class Job:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # resolved: the tree config, or None for plain decoding
    speculation: SpeculationConfig | None
    # time.monotonic() after which the request stops; None = no deadline
    deadline: float | None = None
    # whether the caller streams text (else intermediate events carry none)
    text_deltas: bool = True
    cancel: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)
    arrival: float = field(default_factory=time.monotonic)

    def should_stop(self) -> bool:
        return self.cancel.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)


@dataclass
class ServerTotals:
    """Server-wide counters over finished requests (same definitions as ``SpecStats``)."""

    finished: int = 0
    failed: int = 0
    aborted: int = 0
    spec: SpecStats = field(default_factory=SpecStats)


class EngineWorker:
    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int = 64, max_tokens_limit: int = 4096) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_tokens_limit = max_tokens_limit
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.running: Job | None = None
        self.running_kv_tokens = 0
        self.totals = ServerTotals()
        self.accepting = True
        self._thread = threading.Thread(target=self._loop, name="spruce-engine", daemon=True)
        self._thread.start()

    # ---- callers ------------------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        speculation: SpeculationConfig | None | Any = DEFAULT,
        request_id: str = "",
        timeout_s: float | None = None,
        text_deltas: bool = True,
    ) -> Job:
        """Validate and queue a request; raises ``InvalidRequestError`` or ``OverloadedError`` at once.
        ``text_deltas=False``: the caller reads only the final output (no per-step decode)."""
        if params.max_tokens > self.max_tokens_limit:
            raise InvalidRequestError(f"max_tokens {params.max_tokens} is above this server's limit {self.max_tokens_limit}")
        prompt_ids = self.engine.encode(prompt)
        spec = self.engine.resolve_speculation(speculation)  # a drafter the server cannot run fails now
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            if not self.accepting:
                raise OverloadedError("the server is shutting down")
            request_id = request_id or f"req-{next(self._ids)}"
            if request_id in self._jobs:
                raise InvalidRequestError(f"request_id {request_id!r} is already in use")
            job = Job(request_id, prompt_ids, params, spec, deadline, text_deltas)
            # registered before it is queued: the worker may take and finish it at once
            self._jobs[request_id] = job
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                del self._jobs[request_id]
                raise OverloadedError(f"the request queue is full ({self._queue.maxsize} waiting): retry later") from None
        self.metrics.waiting.labels(self.metrics.model_name).set(self.waiting)
        return job

    def events(self, job: Job) -> Iterator[StreamEvent]:
        """The job's steps as they happen; the last carries the output. Re-raises the request's error."""
        while True:
            item = job.events.get()
            if isinstance(item, tuple) and item and item[0] is _FAILED:
                raise item[1]
            yield item
            if item.output is not None:
                return

    def abort(self, request_id: str) -> bool:
        with self._lock:
            job = self._jobs.get(request_id)
        if job is None:
            return False
        job.cancel.set()
        return True

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def drain(self, grace_s: float) -> None:
        """Refuse new requests, let queued and running ones finish for up to ``grace_s``, abort the rest."""
        with self._lock:
            self.accepting = False
        end = time.monotonic() + grace_s
        while time.monotonic() < end and (self._jobs or self.running is not None):
            time.sleep(0.02)
        with self._lock:
            for job in self._jobs.values():
                job.cancel.set()
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ---- the loop -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self.metrics.waiting.labels(self.metrics.model_name).set(self.waiting)
            self.running = job
            self.metrics.running.labels(self.metrics.model_name).set(1)
            try:
                self._run(job)
            finally:
                self.running = None
                self.running_kv_tokens = 0
                self.metrics.running.labels(self.metrics.model_name).set(0)
                self.metrics.kv_usage.labels(self.metrics.model_name).set(0)
                with self._lock:
                    self._jobs.pop(job.request_id, None)

    def _run(self, job: Job) -> None:
        m = self.metrics
        name = m.model_name
        if job.should_stop():  # aborted or expired while queued: nothing was computed
            self._finish(job, StreamEvent([], "", _aborted(job)))
            return
        self.running_kv_tokens = len(job.prompt_ids)
        last = job.arrival
        try:
            stream = self.engine.run_encoded(job.prompt_ids, job.params, job.speculation, job.should_stop, job.text_deltas)
            for event in stream:
                now = time.monotonic()
                if event.token_ids:
                    (m.ttft if last == job.arrival else m.itl).labels(name).observe(now - last)
                    last = now
                # the target cache holds the prompt and the output so far (one slot per token)
                self.running_kv_tokens += len(event.token_ids)
                m.kv_usage.labels(name).set(min(1.0, self.running_kv_tokens / self.engine.max_context))
                if event.output is not None:
                    self._finish(job, event)
                    return
                job.events.put(event)
        except Exception as exc:  # the request fails alone; the worker goes on
            log.exception("request %s failed", job.request_id)
            self.totals.failed += 1
            job.events.put((_FAILED, exc))

    def _finish(self, job: Job, event: StreamEvent) -> None:
        out = event.output
        assert out is not None
        self.metrics.e2e.labels(self.metrics.model_name).observe(time.monotonic() - job.arrival)
        self.metrics.request_finished(out.stats, len(job.prompt_ids), out.finish_reason)
        self.totals.finished += 1
        self.totals.aborted += out.finish_reason == FINISH_ABORT
        self.totals.spec.merge(out.stats)
        job.events.put(event)


def _aborted(job: Job) -> GenerationOutput:
    return GenerationOutput(text="", token_ids=[], finish_reason=FINISH_ABORT, stats=SpecStats(), prompt_token_ids=job.prompt_ids)
