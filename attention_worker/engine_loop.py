"""Runs an ``Engine`` on its own thread and fans its outputs out to per-request queues.

Threads: gRPC handler threads call ``submit``/``abort`` (they enqueue and wake the loop) and
read their request's queue; the loop thread calls ``Engine.step`` while there is work and
sleeps on a condition variable otherwise — an idle worker uses no CPU. An exception on the
loop thread is fatal: it is logged and the process exits, rather than living on half-dead.
"""

from __future__ import annotations

import queue
import threading

from epserve.attention_worker.engine import DuplicateRequest, Engine, RequestRejected, StepOutput
from epserve.process import start_daemon_thread
from epserve.sampling import SamplingParams


class EngineLoop:
    def __init__(self, engine: Engine, max_requests: int | None = None) -> None:
        """``max_requests``: requests running and waiting at most (None: no limit); past it ``submit``
        raises RequestRejected (the service answers RESOURCE_EXHAUSTED)."""
        self.engine = engine
        self.max_requests = max_requests
        self._streams: dict[str, queue.SimpleQueue[StepOutput]] = {}
        self._streams_lock = threading.Lock()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = start_daemon_thread(self._run, "engine-loop")   # a crash ends the process

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               num_generated_before: int = 0, trace_context: bytes = b"") -> queue.SimpleQueue[StepOutput]:
        """Raises RequestRejected (DuplicateRequest for an id already here) / ValueError for requests that
        cannot be served."""
        stream: queue.SimpleQueue[StepOutput] = queue.SimpleQueue()
        with self._streams_lock:
            if self.max_requests is not None and len(self._streams) >= self.max_requests:
                raise RequestRejected(f"{len(self._streams)} requests are running or waiting here, this worker's "
                                      "limit (--max-running-requests + --max-queued-requests); retry later")
            if request_id in self._streams:     # keep the running request's stream
                raise DuplicateRequest(f"request_id {request_id!r} is already running")
            self._streams[request_id] = stream
        try:
            self.engine.add_request(request_id, prompt_ids, params, num_generated_before, trace_context)
        except Exception:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            raise
        self._notify()
        return stream

    def abort(self, request_id: str) -> bool:
        found = self.engine.abort(request_id)
        self._notify()
        return found

    def wake(self) -> None:
        """Make the loop look at the engine again (e.g. a new expert map while idle)."""
        self._notify()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self.engine.has_work:
                    self._wake.wait()
                if self._stopped:
                    return
            for output in self.engine.step():
                with self._streams_lock:
                    stream = (self._streams.pop(output.request_id, None) if output.finished
                              else self._streams.get(output.request_id))
                if stream is not None:
                    stream.put(output)
