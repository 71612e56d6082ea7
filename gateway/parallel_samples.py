"""``n`` samples of one prompt (OpenAI's ``n``), run as ``n`` gateway requests and merged into one
stream of ``(index, GenerateOutput)``.

epserve's KV cache holds no shared prefixes, so the samples are separate sequences (each one
prefills the prompt); the router may place them on different attention workers. Each sample has
its own seed (``SglangRequest.sample_inputs``), so a seeded request draws the same ``n``
completions every time, and different ones from each other.

Threads: with n = 1 the one request runs in the caller's thread (as an epserve.v1 Generate does).
With n > 1 one thread per sample iterates its ``RequestHandle.outputs()`` into a queue the
caller's thread drains. ``cancel`` (the client went away) and ``abort`` (an Abort RPC) reach every
sample from any thread. A sample that fails (a ``GatewayError``) cancels the others and the error
is raised to the caller.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from epserve.gateway.errors import GatewayError
from epserve.gateway.request_manager import RequestHandle, RequestManager
from epserve.gateway.request_types import GenerateInput, GenerateOutput
from epserve.process import start_daemon_thread

_DONE = object()


class ParallelSamples:
    def __init__(self, manager: RequestManager, inputs: list[GenerateInput], timeout_s: float | None) -> None:
        """Submits every sample (validation errors raise here); a failed submission cancels the
        samples submitted before it."""
        assert inputs, "at least one sample"
        self._manager = manager
        self._handles: list[RequestHandle] = []
        self._lock = threading.Lock()
        self._stopped = False
        try:
            for inp in inputs:
                self._handles.append(manager.submit(inp, timeout_s=timeout_s))
        except GatewayError:
            self.cancel()
            raise

    @property
    def request_ids(self) -> list[str]:
        return [handle.request_id for handle in self._handles]

    def outputs(self) -> Iterator[tuple[int, GenerateOutput]]:
        """Every sample's outputs as they come; a sample's own outputs stay in order."""
        if len(self._handles) == 1:
            for output in self._handles[0].outputs():
                yield 0, output
            return
        merged: queue.SimpleQueue = queue.SimpleQueue()
        for index, handle in enumerate(self._handles):
            start_daemon_thread(lambda i=index, h=handle: self._pump(i, h, merged), f"sample-{handle.request_id}")
        running = len(self._handles)
        try:
            while running:
                index, item = merged.get()
                if item is _DONE:
                    running -= 1
                elif isinstance(item, GatewayError):
                    self.cancel()
                    raise item
                else:
                    yield index, item
        except GeneratorExit:
            self.cancel()
            raise

    @staticmethod
    def _pump(index: int, handle: RequestHandle, merged: queue.SimpleQueue) -> None:
        try:
            for output in handle.outputs():
                merged.put((index, output))
        except GatewayError as exc:
            merged.put((index, exc))
        merged.put((index, _DONE))

    def cancel(self) -> None:
        """The client went away: every sample stops, at its worker too, with nothing more sent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        for handle in self._handles:
            handle.cancel()

    def abort(self) -> bool:
        """An Abort RPC: every sample still running ends with finish_reason ABORT."""
        return any([self._manager.abort(request_id) for request_id in self.request_ids])
