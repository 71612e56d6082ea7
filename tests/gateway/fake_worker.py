"""A scripted AttentionWorker for gateway tests (a test double, not a model).

Every request gets the same token script: completion token i (counted from the request's
``num_generated_before``, so a retry continues where the lost worker stopped) is
``script[i % len(script)]``, one token per ``--token-delay-s`` (with made-up logprobs when asked:
``fake_logprobs``). It honours max_new_tokens
(finish LENGTH), stop_token_ids and the EOS id unless ignore_eos (finish STOP), Abort (the
stream ends with finish ABORT) and a cancelled stream. Its health is NOT_SERVING for
``--serving-after-s`` after start (a worker still waiting for its expert map). Everything it sees is appended as JSON
lines to ``--events`` (event: generate / abort / cancelled / finished) for the test to read.

Run: python tests/gateway/fake_worker.py --script-ids 1,2,3 --events PATH  (prints WORKER_PORT=)
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from dataclasses import dataclass, field

from epserve.grpc_server import serve_grpc
from epserve.protos import generation_pb2, worker_pb2, worker_pb2_grpc

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class _Running:
    stop: threading.Event = field(default_factory=threading.Event)
    aborted_by_rpc: bool = False
    finished: bool = False


def fake_logprobs(sampling, token: int, position: int) -> list[generation_pb2.TokenLogprob]:
    """return_logprob: the token's logprob is -(position + 1) / 10, its top N are token, token + 1, ..."""
    if not sampling.return_logprob:
        return []
    n = sampling.top_logprobs_num
    return [generation_pb2.TokenLogprob(logprob=-(position + 1) / 10, top_token_ids=[token + k for k in range(n)],
                                        top_logprobs=[-(position + 1 + k) / 10 for k in range(n)])]


SLOW_FACTOR = 5


class ScriptedWorker(worker_pb2_grpc.AttentionWorkerServicer):
    def __init__(self, worker_id: str, script: list[int], token_delay_s: float, eos_id: int,
                 events_path: str, slow_seed: int | None = None) -> None:
        self.worker_id = worker_id
        self.script = script
        self.token_delay_s = token_delay_s
        self.slow_seed = slow_seed          # requests with this seed take SLOW_FACTOR times longer a token
        self.eos_id = eos_id
        self._events_path = events_path
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}

    def _log(self, **event) -> None:
        with self._lock, open(self._events_path, "a") as f:
            f.write(json.dumps({"worker_id": self.worker_id, **event}) + "\n")

    def Generate(self, request, context):
        sampling = request.sampling
        max_new = sampling.max_new_tokens if sampling.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
        self._log(event="generate", request_id=request.request_id, prompt_ids=list(request.prompt_ids),
                  num_generated_before=request.num_generated_before, max_new_tokens=max_new,
                  stop_token_ids=list(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos,
                  stop=list(sampling.stop), seed=sampling.seed if sampling.HasField("seed") else None,
                  return_logprob=sampling.return_logprob, top_logprobs_num=sampling.top_logprobs_num)
        state = _Running()
        with self._lock:
            self._running[request.request_id] = state

        def on_done() -> None:
            if not state.finished:
                self._log(event="cancelled", request_id=request.request_id)
                state.stop.set()

        context.add_callback(on_done)
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else {self.eos_id})
        start = request.num_generated_before
        slow = self.slow_seed is not None and sampling.HasField("seed") and sampling.seed == self.slow_seed
        delay_s = self.token_delay_s * (SLOW_FACTOR if slow else 1)
        try:
            for i in range(max_new):
                if state.stop.wait(delay_s):
                    if state.aborted_by_rpc:
                        yield worker_pb2.WorkerGenerateResponse(
                            finished=True, finish_reason=generation_pb2.FINISH_REASON_ABORT)
                    return
                token = self.script[(start + i) % len(self.script)]
                stopped = token in stop_ids
                finished = stopped or i + 1 == max_new
                reason = (generation_pb2.FINISH_REASON_STOP if stopped else
                          generation_pb2.FINISH_REASON_LENGTH if finished else 0)
                yield worker_pb2.WorkerGenerateResponse(
                    token_ids=[token], finished=finished, finish_reason=reason,
                    prompt_tokens=len(request.prompt_ids) - start, completion_tokens=start + i + 1,
                    matched_stop_token=token if stopped else None, logprobs=fake_logprobs(sampling, token, start + i))
                if finished:
                    break
        finally:
            state.finished = True
            with self._lock:
                if self._running.get(request.request_id) is state:
                    del self._running[request.request_id]
            self._log(event="finished", request_id=request.request_id)

    def Abort(self, request, context):
        with self._lock:
            state = self._running.get(request.request_id)
        self._log(event="abort", request_id=request.request_id, found=state is not None)
        if state is not None:
            state.aborted_by_rpc = True
            state.stop.set()
        return generation_pb2.AbortResponse(found=state is not None)

    def GetLoad(self, request, context):
        with self._lock:
            num_running = len(self._running)
        return worker_pb2.WorkerLoad(worker_id=self.worker_id, num_running=num_running)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--worker-id", default="fake")
    parser.add_argument("--script-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--token-delay-s", type=float, default=0.01)
    parser.add_argument("--eos-id", type=int, default=-1)
    parser.add_argument("--events", required=True)
    parser.add_argument("--slow-seed", type=int, default=None,
                        help=f"requests with this seed stream {SLOW_FACTOR}x slower (samples finishing out of order)")
    parser.add_argument("--serving-after-s", type=float, default=0.0,
                        help="health NOT_SERVING for this long after start (a worker waiting for its map)")
    args = parser.parse_args()
    worker = ScriptedWorker(args.worker_id, [int(t) for t in args.script_ids.split(",")], args.token_delay_s,
                            args.eos_id, args.events, args.slow_seed)
    server = serve_grpc([(worker_pb2_grpc.add_AttentionWorkerServicer_to_server, worker,
                          "epserve.v1.AttentionWorker")], "127.0.0.1", args.port,
                        serving=args.serving_after_s <= 0)
    if args.serving_after_s > 0:
        threading.Timer(args.serving_after_s, server.set_serving, args=(True,)).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"WORKER_PORT={server.port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(0.5)


if __name__ == "__main__":
    main()
