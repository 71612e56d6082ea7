"""Seeded random requests against a running deployment's public and admin APIs, for the hardening
fuzz test (tests/e2e/test_hardening.py, a few hundred cases) and bench/hardening.py (10,000+).

    fuzzer = Fuzzer(seed=0, gateway="127.0.0.1:50050", placement="127.0.0.1:40000", security=...)
    outcome = fuzzer.run(num_cases)        # Outcome: count per status code, examples of each

Every case is one call: a Generate with random fields (extreme floats, NaN and inf, huge or
negative integers, unknown token ids, empty, long or odd strings, repeated request ids), an admin
call with random arguments (redundancy, layers, algorithms, snapshots as random or deeply nested
JSON, long worker ids, rollbacks, EPLB pause/resume), or undecodable bytes. A healthy deployment
answers each with a status from ALLOWED; UNKNOWN, INTERNAL or UNAVAILABLE mean something broke.
Nothing here changes more than the map (no valid worker id is drained, dumps go under ``dump_root``).
"""

from __future__ import annotations

import json
import math
import random
import string
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from epserve.grpc_security import PLAINTEXT, Security, open_channel
from epserve.protos import generation_pb2, generation_pb2_grpc, placement_pb2, placement_pb2_grpc

ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "CANCELLED", "DEADLINE_EXCEEDED",
           # typed answers of the admin API: unknown worker/version, nothing to roll back, no load reported yet
           "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS"}
FLOATS = (0.0, -0.0, 1e-45, 1e-39, 1e-38, 1e-30, 1e-7, 0.1, 0.5, 0.999999, 1.0, 1.0000001, 2.0, 100.0, 1e30, 3.4e38,
          math.inf, -math.inf, math.nan, -1.0, -1e-45)
INTS = (0, 1, 2, 3, 7, 20, 21, 64, 1000, 2**31 - 1, -1, -2**31)
TEXTS = ("", "Hello", "a", " ", "\n\n", "日本語 😀", "\x00\x01\x02", "\ud7ff\ue000", "the " * 50)


@dataclass
class Outcome:
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, code: str, detail: str = "") -> None:
        self.counts[code] += 1
        self.examples.setdefault(code, [])
        if len(self.examples[code]) < 5:
            self.examples[code].append(f"{kind}: {detail[:200]}")

    @property
    def unexpected(self) -> dict[str, list[str]]:
        return {code: self.examples[code] for code in self.counts if code not in ALLOWED}


class Fuzzer:
    def __init__(self, seed: int, gateway: str, placement: str, security: Security = PLAINTEXT,
                 vocab_size: int = 1024, dump_root: str = "/tmp/epserve-fuzz-dumps", timeout_s: float = 60.0,
                 admin_share: float = 0.3, raw_share: float = 0.05) -> None:
        self.rng = random.Random(seed)
        self.vocab_size, self.dump_root, self.timeout_s = vocab_size, dump_root, timeout_s
        self.admin_share, self.raw_share = admin_share, raw_share
        self._gateway_channel = open_channel(gateway, PLAINTEXT if not security.tls else
                                             Security(tls_cert=security.tls_cert, tls_key=security.tls_key,
                                                      tls_ca=security.tls_ca))
        self._admin_channel = open_channel(placement, security)
        self.generation = generation_pb2_grpc.GenerationStub(self._gateway_channel)
        self.admin = placement_pb2_grpc.PlacementAdminStub(self._admin_channel)
        self._ids: list[str] = []

    def close(self) -> None:
        self._gateway_channel.close()
        self._admin_channel.close()

    def run(self, num_cases: int, outcome: Outcome | None = None, deadline_s: float | None = None) -> Outcome:
        outcome = outcome or Outcome()
        stop_at = time.monotonic() + deadline_s if deadline_s else None
        for _ in range(num_cases):
            if stop_at is not None and time.monotonic() > stop_at:
                break
            roll = self.rng.random()
            if roll < self.raw_share:
                self._call(outcome, "raw", self._raw)
            elif roll < self.raw_share + self.admin_share:
                self._call(outcome, "admin", self._admin_case)
            else:
                self._call(outcome, "generate", self._generate_case)
        return outcome

    def _call(self, outcome: Outcome, kind: str, case) -> None:
        try:
            detail = case()
        except grpc.RpcError as exc:
            outcome.add(kind, exc.code().name, exc.details() or "")
        else:
            outcome.add(kind, "OK", detail or "")

    # -- Generate --------------------------------------------------------------------------------
    def _generate_case(self) -> str:
        request = generation_pb2.GenerateRequest(request_id=self._request_id(), sampling=self._sampling())
        which = self.rng.random()
        if which < 0.6:
            request.text = self._text()
        elif which < 0.95:
            request.token_ids.ids.extend(self._token_ids())
        timeout = self.rng.choice((self.timeout_s, self.timeout_s, self.timeout_s, 0.05))
        responses = list(self.generation.Generate(request, timeout=timeout))
        return f"{len(responses)} messages"

    def _request_id(self) -> str:
        roll = self.rng.random()
        if roll < 0.3:
            rid = ""
        elif roll < 0.5 and self._ids:
            rid = self.rng.choice(self._ids)          # reused right after it ended
        elif roll < 0.6:
            rid = "x" * self.rng.choice((257, 1000, 10_000))
        else:
            rid = "".join(self.rng.choices(string.printable + "日本😀", k=self.rng.randint(1, 40)))
        self._ids = (self._ids + [rid])[-20:]
        return rid

    def _text(self) -> str:
        roll = self.rng.random()
        if roll < 0.5:
            return self.rng.choice(TEXTS)
        if roll < 0.8:
            return "".join(self.rng.choices(string.printable, k=self.rng.randint(1, 200)))
        if roll < 0.95:
            return "".join(_char(self.rng.randint(32, 0x2FFFF)) for _ in range(self.rng.randint(1, 50)))
        return "word " * self.rng.choice((2000, 20_000, 300_000))     # past the context, past the byte limit

    def _token_ids(self) -> list[int]:
        roll = self.rng.random()
        n = self.rng.choice((0, 1, 3, 10, 100, 5000))
        if roll < 0.7:
            return [self.rng.randrange(self.vocab_size) for _ in range(n)]
        return [self.rng.choice((0, self.vocab_size - 1, self.vocab_size, 2**31 - 1, -1, -2**31))
                for _ in range(max(n, 1))]

    def _sampling(self) -> generation_pb2.SamplingParams:
        params = generation_pb2.SamplingParams()
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if self.rng.random() < 0.4:
                setattr(params, name, self.rng.choice(FLOATS) if self.rng.random() < 0.7 else self.rng.random() * 2)
        if self.rng.random() < 0.3:
            params.top_k = self.rng.choice(INTS)
        if self.rng.random() < 0.3:
            params.seed = self.rng.choice((0, 1, 2**63, 2**64 - 1))
        # mostly short generations: the fuzz is about acceptance, not length
        params.max_new_tokens = self.rng.choice((1, 2, 3, 4)) if self.rng.random() < 0.9 else self.rng.choice(INTS)
        if self.rng.random() < 0.2:
            params.stop.extend(self.rng.choice((["x"], [""], ["\n", "the"], ["a" * 1000])))
        if self.rng.random() < 0.2:
            params.stop_token_ids.extend(self.rng.choice(([0], [self.vocab_size], [-1], [2**31 - 1])))
        params.ignore_eos = self.rng.random() < 0.3
        if self.rng.random() < 0.1:
            params.return_logprob = True
            params.top_logprobs_num = self.rng.choice((0, 1, 5, 20, 21, -1, 2**31 - 1))
        return params

    # -- admin -----------------------------------------------------------------------------------
    def _admin_case(self) -> str:
        rng, admin, t = self.rng, self.admin, self.timeout_s
        op = rng.choice(("get", "get", "list", "plan", "redundancy", "redundancy", "snapshot", "snapshot", "drain",
                         "rollback", "eplb", "dump", "export", "rebalance"))
        if op == "get":
            admin.GetPlacement(placement_pb2.GetPlacementRequest(version=rng.choice((0, 1, 2, 99, 2**64 - 1))),
                               timeout=t)
        elif op == "list":
            admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=t)
        elif op in ("plan", "rebalance"):
            request = placement_pb2.RebalanceRequest(algorithm=rng.choice(("", "deepseek", "bogus", "x" * 5000)),
                                                     layers=rng.choice(([], [0], [0, 0], [-1], [2**31 - 1],
                                                                        list(range(10_000)))))
            (admin.PlanRebalance if op == "plan" else admin.Rebalance)(request, timeout=t)
        elif op == "redundancy":
            value = rng.choice((-1, -2**31, 2**31 - 1, 2147483646, 1000, 3, 5, 7, 9, 99))
            admin.SetRedundancy(placement_pb2.SetRedundancyRequest(num_redundant_experts=value), timeout=t)
        elif op == "snapshot":
            admin.ImportSnapshot(placement_pb2.Snapshot(json=self._snapshot_json()), timeout=t)
        elif op == "drain":
            worker_id = rng.choice(("", "nobody", "attention-0", "x" * 10_000, "expert-\x00", "日本"))
            admin.DrainWorker(placement_pb2.DrainWorkerRequest(worker_id=worker_id), timeout=t)
        elif op == "rollback":
            admin.Rollback(placement_pb2.RollbackRequest(), timeout=t)
        elif op == "eplb":
            (admin.PauseEplb(placement_pb2.PauseEplbRequest(), timeout=t) if rng.random() < 0.5
             else admin.ResumeEplb(placement_pb2.ResumeEplbRequest(), timeout=t))
        elif op == "dump":
            directory = rng.choice(("", "relative/dir", f"{self.dump_root}/{rng.randrange(4)}", "/" + "d" * 5000))
            admin.DumpExpertDistribution(placement_pb2.AdminDumpExpertDistributionRequest(
                directory=directory, worker_timeout_s=rng.choice((0.0, 1.0, -1.0, math.inf, math.nan))), timeout=t)
        else:
            admin.ExportSnapshot(placement_pb2.ExportSnapshotRequest(), timeout=t)
        return op

    def _snapshot_json(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.15:
            return "[" * rng.choice((100, 200_000)) + "]" * rng.choice((0, 100))
        if roll < 0.3:
            return "".join(rng.choices(string.printable, k=rng.randint(0, 300)))
        num_layers, num_slots = rng.choice((1, 2, 3, 4)), rng.choice((0, 1, 4, 8, 10, 16, 12))
        content = {"num_layers": rng.choice((num_layers, -1, "x", None)),
                   "num_logical_experts": rng.choice((8, 0, -3, 2**40)),
                   "physical_to_logical_map": [[rng.choice((0, 1, 7, -1, 8, 10**20)) for _ in range(num_slots)]
                                               for _ in range(num_layers)]}
        if rng.random() < 0.3:
            content["logical_count"] = [[rng.choice((0, 1, 1e308, -5)) for _ in range(8)] for _ in range(num_layers)]
        if rng.random() < 0.2:
            content.pop(rng.choice(list(content)))
        return json.dumps(content)

    # -- undecodable bytes -----------------------------------------------------------------------
    def _raw(self) -> str:
        payload = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 64)))
        if self.rng.random() < 0.5:
            call = self._gateway_channel.unary_stream("/epserve.v1.Generation/Generate",
                                                      request_serializer=lambda b: b, response_deserializer=None)
            list(call(payload, timeout=self.timeout_s))
        else:
            call = self._admin_channel.unary_unary("/epserve.v1.PlacementAdmin/SetRedundancy",
                                                   request_serializer=lambda b: b, response_deserializer=None)
            call(payload, timeout=self.timeout_s)
        return "raw bytes answered"


def _char(code: int) -> str:
    """A character a client can send (a proto string is UTF-8: no lone surrogates)."""
    return chr(code) if not 0xD800 <= code <= 0xDFFF else "\ufffd"
