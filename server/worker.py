"""The engine behind the service: one worker thread drives the continuous-batching engine
(``Engine.step``) and streams each request's steps back to its caller.

A request is a ``Job``: validated before it is queued (bad input never waits), refused with
``OverloadedError`` when too many wait for a KV slot or the server is draining, stopped between two
target passes when it is aborted, cancelled by its client or past its deadline. A failing request fails
alone: the exception goes to its caller and the batch goes on. KV slots belong to the running request
and are freed when it ends, however it ends.
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

from spruce.server.metrics import Metrics

from spruce.config import SamplingParams, SpeculationConfig
from spruce.engine import DEFAULT, Engine, StreamEvent
from spruce.errors import DeadlineExceededError, InvalidRequestError, OverloadedError
from spruce.stats import SpecStats
from spruce.stopping import FINISH_ABORT

log = logging.getLogger(__name__)

# seconds between two steps of an idle tensor-parallel server (``spruce.parallel``)
TP_IDLE_STEP_S = 1.0

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
    # the engine's handle, and when the last token was sent (TTFT, then inter-token latency)
    request: Any = None
    last_token: float = 0.0

    def __post_init__(self) -> None:
        self.last_token = self.arrival

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.past_deadline()

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


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
        self.max_queue = max_queue
        self._jobs: dict[str, Job] = {}
        # the engine's request handle (by identity) -> its job
        self._by_request: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._stopping = False
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
            if self.engine.num_waiting >= self.max_queue:
                raise OverloadedError(
                    f"the request queue is full ({self.max_queue} waiting for a KV slot): retry later"
                )
            job = Job(request_id, prompt_ids, params, spec, deadline, text_deltas)
            job.request = self.engine.add_request(prompt_ids, params, spec, job.should_stop, text_deltas)
            self._jobs[request_id] = job
            self._by_request[id(job.request)] = job
            self._wake.notify()
        self.metrics.waiting.labels(self.metrics.model_name).set(self.waiting)
        return job

    def events(self, job: Job) -> Iterator[StreamEvent]:
        """The job's steps as they happen; the last carries the output. Re-raises the request's error."""
        while True:
            item = job.events.get()
            if item.error is not None:
                raise item.error
            if item.output is not None and item.output.finish_reason == FINISH_ABORT and job.past_deadline():
                # stopped by its deadline: the caller gets the deadline's error, not a short answer
                raise DeadlineExceededError(
                    f"the request's deadline passed after {len(item.output.token_ids)} generated tokens"
                )
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
        return self.engine.num_waiting

    @property
    def running(self) -> int:
        return self.engine.num_running

    def drain(self, grace_s: float) -> None:
        """Refuse new requests, let queued and running ones finish for up to ``grace_s``, abort the rest."""
        with self._lock:
            self.accepting = False
        end = time.monotonic() + grace_s
        while time.monotonic() < end and self._jobs:
            time.sleep(0.02)
        with self._lock:
            for job in self._jobs.values():
                job.cancel.set()
        end = time.monotonic() + 30
        while time.monotonic() < end and self._jobs:  # aborted jobs end at the next step
            time.sleep(0.02)
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ---- the loop -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        m = self.metrics
        name = m.model_name
        while True:
            with self._lock:
                while not self.engine.has_work() and not self._stopping:
                    if self.engine.tp is not None:  # an idle step keeps the other ranks' collectives alive
                        self._wake.wait(timeout=TP_IDLE_STEP_S)
                        break
                    self._wake.wait()
                if self._stopping:
                    self.engine.finish()  # tensor parallelism: the other ranks' ``follow`` returns
                    return
            try:
                events = self.engine.step()
            except Exception:  # the engine isolates request failures; this is a bug, keep serving
                log.exception("engine step failed")
                time.sleep(0.1)
                continue
            now = time.monotonic()
            for req, event in events:
                job = self._job_of(req)
                if job is None:
                    continue
                if event.token_ids:
                    (m.ttft if job.last_token == job.arrival else m.itl).labels(name).observe(now - job.last_token)
                    job.last_token = now
                if event.error is not None:
                    self.totals.failed += 1
                    self._end(job, event)
                elif event.output is not None:
                    self._finish(job, event)
                else:
                    job.events.put(event)
            usage = self.engine.kv_usage()
            m.running.labels(name).set(self.engine.num_running)
            m.waiting.labels(name).set(self.engine.num_waiting)
            m.kv_usage.labels(name).set(usage["positions_used"] / max(1, usage["positions_total"]))

    def _job_of(self, req: Any) -> Job | None:
        with self._lock:
            return self._by_request.get(id(req))

    def _finish(self, job: Job, event: StreamEvent) -> None:
        out = event.output
        assert out is not None
        self.metrics.e2e.labels(self.metrics.model_name).observe(time.monotonic() - job.arrival)
        self.metrics.request_finished(out.stats, len(job.prompt_ids), out.finish_reason)
        self.totals.finished += 1
        self.totals.aborted += out.finish_reason == FINISH_ABORT
        self.totals.spec.merge(out.stats)
        self._end(job, event)

    def _end(self, job: Job, event: StreamEvent) -> None:
        with self._lock:
            self._jobs.pop(job.request_id, None)
            self._by_request.pop(id(job.request), None)
        job.events.put(event)
