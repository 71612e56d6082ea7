"""Chaos benchmark (CPU): greedy streams while processes are killed and restarted on a schedule.

Starts a real deployment (``LocalDeployment``: placement with ``--elastic-ep-backend placement``
and a fixed port and --state-db, expert workers, attention workers, gateway as separate
processes) on a tiny model, runs every prompt once undisturbed (the reference text), then keeps
``--streams`` closed-loop greedy clients busy while ``--schedule`` runs: comma-separated
``SECONDS:ACTION:PROCESS`` entries, seconds from the start of the chaos phase:

- ``kill9`` (SIGKILL) / ``term`` (SIGTERM): stop the process (``expert-N``, ``attention-N``,
  ``placement``, ``gateway``);
- ``restart``: start it again with the command it was first started with;
- ``add``: start a new expert worker under that name (scale-out);
- ``drain``: ``epserve admin drain`` it (it exits once its experts moved away).

Reported per fault: **interruption** — the longest time any stream waited for its next token (or
its first one) among waits that end within ``--window-s`` after the fault, next to the same
figure over the whole undisturbed stretch before the first fault (``steady``); **recovery** —
from the fault until placement's view is settled (a lost expert worker DEAD and holding no
expert; a restarted or added expert worker holding experts; an attention worker DEAD, or ALIVE
again after a restart; placement answering again; a drain: until the admin call returned, i.e.
the change was committed and retired — the drained worker's exit code is reported too); and,
over the run,
**failed requests** (client-side errors) and **mismatches** (completed texts that differ from the
undisturbed run's).

    .venv/bin/python bench/chaos.py [--streams 16] [--schedule DEFAULT] [--out bench/results/chaos_cpu]

Writes OUT.json and OUT.md (runs keyed by --label, each with machine, date and command).
Target (issue 14): interruption <= 2 s with default settings, zero failed requests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc

from epserve.deployment import Child, LocalDeployment

from epserve.deployment_config import DeploymentConfig
from epserve.gateway.client import stream_generate
from epserve.protos import placement_pb2, placement_pb2_grpc

DEFAULT_SCHEDULE = ("6:kill9:expert-3,14:restart:expert-3,22:term:expert-1,30:restart:expert-1,"
                    "38:kill9:expert-0,46:add:expert-4,54:drain:expert-2,62:kill9:attention-1,"
                    "70:restart:attention-1,78:kill9:placement,80:restart:placement")
WORDS = ["river", "mountain", "lantern", "garden", "engine", "market", "winter", "letter", "harbor", "forest",
         "candle", "violin", "desert", "castle", "signal", "orchard"]
PORT_KEYS = {"expert": "EXPERT_WORKER_PORT", "attention": "ATTENTION_WORKER_PORT", "placement": "PLACEMENT_PORT",
             "gateway": "GATEWAY_PORT"}


@dataclass(frozen=True)
class Fault:
    at_s: float
    action: str
    target: str

    @classmethod
    def parse(cls, text: str) -> Fault:
        at, action, target = text.strip().split(":")
        if action not in ("kill9", "term", "restart", "add", "drain"):
            raise ValueError(f"unknown action {action!r} in {text!r}")
        return cls(float(at), action, target)


@dataclass
class Request:
    prompt: str
    submitted: float
    arrivals: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""
    done: bool = False


class Streams:
    """Closed-loop greedy clients over a fixed prompt list; every request's token times are kept."""

    def __init__(self, gateway: str, prompts: list[str], num_streams: int, max_new_tokens: int) -> None:
        self.gateway, self.prompts, self.max_new_tokens = gateway, prompts, max_new_tokens
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i, num_streams), daemon=True)
                         for i in range(num_streams)]
        for thread in self._threads:
            thread.start()

    def _client(self, index: int, stride: int) -> None:
        n = index
        while not self._stop.is_set():
            request = Request(self.prompts[n % len(self.prompts)], time.monotonic())
            n += stride
            with self._lock:
                self.requests.append(request)
            parts = []
            try:
                for response in stream_generate(self.gateway, request.prompt, max_new_tokens=self.max_new_tokens,
                                                temperature=0.0, timeout_s=300):
                    parts.append(response.text)
                    if response.token_ids:
                        request.arrivals.append(time.monotonic())
                request.text, request.done = "".join(parts), True
            except grpc.RpcError as exc:
                request.error = f"{exc.code().name}: {exc.details()}"

    def waits(self, start: float, end: float) -> list[tuple[float, float]]:
        """(wait, when it ended) for every wait for a token (from the previous token, or from the
        submission) that ends in [start, end)."""
        out = []
        with self._lock:
            requests = list(self.requests)
        for request in requests:
            previous = request.submitted
            for arrival in list(request.arrivals):
                if start <= arrival < end:
                    out.append((arrival - previous, arrival))
                previous = arrival
        return out

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=300)


class Monitor:
    """Polls placement (map and workers) every 50 ms; keeps timestamped snapshots."""

    def __init__(self, address: str) -> None:
        self.snapshots: list[tuple[float, dict[str, int] | None, dict[str, bool] | None]] = []
        self._channel = grpc.insecure_channel(address)
        self._admin = placement_pb2_grpc.PlacementAdminStub(self._channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                workers = {w.worker_id: w.state for w in
                           self._admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=1).workers}
                view = self._admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=1).map
                per = view.num_physical_slots // max(len(view.slot_owners), 1)
                holds = {owner: any(view.phy2log[layer * view.num_physical_slots + i * per + s] >= 0
                                    for layer in range(view.num_layers) for s in range(per))
                         for i, owner in enumerate(view.slot_owners)}
                self.snapshots.append((time.monotonic(), workers, holds))
            except grpc.RpcError:
                self.snapshots.append((time.monotonic(), None, None))

    def first(self, after: float, predicate) -> float | None:
        for at, workers, holds in list(self.snapshots):
            if at >= after and predicate(workers, holds):
                return at
        return None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._channel.close()


class Processes:
    """Kill, restart and add deployment processes by name."""

    def __init__(self, deployment: LocalDeployment, log_dir: Path) -> None:
        self.deployment, self.log_dir = deployment, log_dir
        self.commands = {c.name: list(c.process.args) for c in deployment.children}

    def current(self, name: str) -> Child:
        return next(c for c in reversed(self.deployment.children) if c.name == name)

    def signal(self, name: str, signum: int) -> None:
        process = self.current(name).process
        process.send_signal(signum)
        process.wait(timeout=30)

    def start(self, name: str) -> None:
        if name in self.commands:
            command = self.commands[name]
        else:                                   # a new expert worker: an existing one's command, its own id
            command = list(self.commands["expert-0"])
            command[command.index("--worker-id") + 1] = name
            self.commands[name] = command
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        self.deployment.children.append(Child(name, process))
        key = PORT_KEYS[name.split("-")[0]]
        for line in process.stdout:
            if line.startswith(f"{key}="):
                break
        threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()


def recovery_s(fault: Fault, at: float, monitor: Monitor, processes: Processes) -> float | None:
    role, name = fault.target.split("-")[0], fault.target
    dead, alive = placement_pb2.WORKER_STATE_DEAD, placement_pb2.WORKER_STATE_ALIVE
    if role == "placement":
        found = monitor.first(at, lambda w, h: w is not None) if fault.action == "restart" else None
    elif role == "expert" and fault.action in ("kill9", "term"):
        found = monitor.first(at, lambda w, h: w is not None and w.get(name) == dead and not h.get(name, False))
    elif role == "expert":
        found = monitor.first(at, lambda w, h: h is not None and h.get(name, False))
    elif fault.action in ("kill9", "term"):
        found = monitor.first(at, lambda w, h: w is not None and w.get(name) == dead)
    else:
        found = monitor.first(at, lambda w, h: w is not None and w.get(name) == alive)
    return None if found is None else found - at


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16, help="concurrent closed-loop greedy clients")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--attention-workers", type=int, default=2)
    parser.add_argument("--expert-workers", type=int, default=4)
    parser.add_argument("--redundant-experts", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--moe-a2a-backend", default="torch", choices=("torch", "cuda_ipc"),
                        help="the data plane (cuda_ipc on the CPU: host shared memory; an added cuda_ipc expert "
                             "worker cannot be reached, so schedule no 'add' with it)")
    parser.add_argument("--attention-backend", default="auto",
                        help="triton with cuda_ipc: the step path GPUs run (on the CPU under TRITON_INTERPRET=1, "
                             "which this sets)")
    parser.add_argument("--schedule", default=DEFAULT_SCHEDULE, help="SECONDS:ACTION:PROCESS,...")
    parser.add_argument("--window-s", type=float, default=10.0, help="waits ending this long after a fault count")
    parser.add_argument("--settle-s", type=float, default=10.0, help="chaos phase goes on this long after the last")
    parser.add_argument("--out", default="bench/results/chaos_cpu")
    parser.add_argument("--label", default="", help="name of this run in the results (default: from the options)")
    args = parser.parse_args()
    faults = [Fault.parse(text) for text in args.schedule.split(",") if text.strip()]

    from epserve.tiny_model import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="epserve-chaos-"))
    model = make_tiny_model(work / "model", seed=0)
    config = DeploymentConfig(
        model_path=str(model), num_attention_workers=args.attention_workers, num_expert_workers=args.expert_workers,
        num_redundant_experts=args.redundant_experts, dtype=args.dtype, placement_port=free_port(),
        state_db=str(work / "placement.db"), log_dir=str(work / "logs"), moe_a2a_backend=args.moe_a2a_backend,
        attention_backend=args.attention_backend, extra_placement_args=["--elastic-ep-backend", "placement"])
    if args.attention_backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"          # the deployment's processes inherit it
    prompts = [f"Stream {i}: the {w} said" for i, w in enumerate(WORDS * 2)]
    load_average = os.getloadavg()[0]
    with LocalDeployment(config) as deployment:
        gateway, placement = f"127.0.0.1:{deployment.gateway_port}", f"127.0.0.1:{deployment.placement_port}"
        processes = Processes(deployment, work / "logs")
        reference = {prompt: "".join(r.text for r in stream_generate(
            gateway, prompt, max_new_tokens=args.max_new_tokens, temperature=0.0, timeout_s=120)) for prompt in prompts}
        monitor = Monitor(placement)
        streams = Streams(gateway, prompts, args.streams, args.max_new_tokens)
        start = time.monotonic()
        applied: list[tuple[Fault, float]] = []
        drain_s: dict[str, float] = {}
        try:
            for fault in faults:
                time.sleep(max(start + fault.at_s - time.monotonic(), 0))
                at = time.monotonic()
                print(f"{at - start:6.1f} s: {fault.action} {fault.target}", flush=True)
                if fault.action == "kill9":
                    processes.signal(fault.target, signal.SIGKILL)
                elif fault.action == "term":
                    processes.signal(fault.target, signal.SIGTERM)
                elif fault.action in ("restart", "add"):
                    processes.start(fault.target)
                else:                            # drain: answered once the change is committed and retired
                    with grpc.insecure_channel(placement) as channel:
                        placement_pb2_grpc.PlacementAdminStub(channel).DrainWorker(
                            placement_pb2.DrainWorkerRequest(worker_id=fault.target), timeout=120)
                    drain_s[fault.target] = time.monotonic() - at
                applied.append((fault, at))
            time.sleep(args.settle_s)
        finally:
            streams.stop()
            monitor.stop()
        drained = {f.target: processes.current(f.target).process.poll() for f, _ in applied if f.action == "drain"}
    first_fault = applied[0][1] if applied else time.monotonic()
    steady = [wait for wait, _ in streams.waits(start, first_fault)]
    rows = []
    for fault, at in applied:
        waits = streams.waits(at, at + args.window_s)
        longest, ended = max(waits, default=(0.0, at))
        recovered = drain_s.get(fault.target) if fault.action == "drain" else recovery_s(fault, at, monitor, processes)
        rows.append({"at_s": round(at - start, 2), "action": fault.action, "target": fault.target,
                     "interruption_s": round(longest, 3), "interruption_ended_s": round(ended - at, 3),
                     "recovery_s": None if recovered is None else round(recovered, 3),
                     "drained_exit_code": drained.get(fault.target) if fault.action == "drain" else None})
        print(f"{fault.action} {fault.target}: interruption {rows[-1]['interruption_s']:.3f} s, recovery "
              f"{rows[-1]['recovery_s']}", flush=True)
    requests = streams.requests
    completed = [r for r in requests if r.done]
    summary = {
        "requests": len(requests), "completed": len(completed),
        "failed": sum(1 for r in requests if r.error), "errors": sorted({r.error for r in requests if r.error})[:10],
        "mismatches": sum(1 for r in completed if r.text != reference[r.prompt]),
        "max_interruption_s": max((row["interruption_s"] for row in rows), default=0.0),
        "steady_max_wait_s": round(max(steady, default=0.0), 3),
        "steady_median_wait_s": round(statistics.median(steady), 4) if steady else 0.0,
    }
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} (CPU, {os.cpu_count()} cores)",
            "command": "python bench/chaos.py " + " ".join(f"--{k.replace('_', '-')} {v!r}" if k == "schedule"
                                                           else f"--{k.replace('_', '-')} {v}"
                                                           for k, v in vars(args).items() if k not in ("out", "label")),
            "load_average_at_start": load_average,
            "deployment": {"attention_workers": args.attention_workers, "expert_workers": args.expert_workers,
                           "redundant_experts": args.redundant_experts, "dtype": args.dtype,
                           "model": "make_tiny_model(seed=0): 2 MoE layers, 8 experts, top-2, hidden 64",
                           "placement": "--elastic-ep-backend placement, other flags default"}}
    label = args.label or f"{args.streams} streams, {len(faults)} faults"
    write_results(Path(args.out), label, {"meta": meta, "summary": summary, "faults": rows})
    print(json.dumps(summary, indent=2))


NOTES_MARKER = "<!-- notes: kept when the tables are rewritten -->"


def write_results(out: Path, label: str, run: dict) -> None:
    """Add (or replace) run ``label`` in OUT.json; rewrite OUT.md's tables, keeping the notes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    runs[label] = run
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    md = out.with_suffix(".md")
    notes = md.read_text().split(NOTES_MARKER, 1)[1] if md.exists() and NOTES_MARKER in md.read_text() else "\n"
    lines = ["# Chaos (CPU): greedy streams while processes die and come back\n",
             "Target (issue 14): interruption <= 2 s with default settings, zero failed requests. Interruption = "
             "the longest any stream waited for its next (or first) token, among waits ending within the window "
             "after the fault; recovery = until placement's view settled (see bench/chaos.py). Produced by "
             "`bench/chaos.py`.\n"]
    for name, r in runs.items():
        m, x = r["meta"], r["summary"]
        lines += [f"## {name}\n",
                  f"`{m['command']}` on {m['machine']}, {m['date']} (load average at start "
                  f"{m['load_average_at_start']:.1f}); deployment {m['deployment']}.\n",
                  f"Requests {x['requests']}, completed {x['completed']}, **failed {x['failed']}**, **mismatches "
                  f"{x['mismatches']}** (vs an undisturbed run); **max interruption {x['max_interruption_s']:.2f} s**; "
                  f"steady waits: median {x['steady_median_wait_s'] * 1000:.0f} ms, max "
                  f"{x['steady_max_wait_s'] * 1000:.0f} ms.\n",
                  "| at (s) | fault | interruption (s) | it ended at (s after the fault) | recovery (s) |",
                  "|---|---|---|---|---|"]
        for row in r["faults"]:
            recovery = "—" if row["recovery_s"] is None else f"{row['recovery_s']:.2f}"
            if row["action"] == "drain":
                recovery += f" (exited with {row['drained_exit_code']})"
            lines.append(f"| {row['at_s']:.1f} | {row['action']} {row['target']} | {row['interruption_s']:.3f} | "
                         f"{row['interruption_ended_s']:.2f} | {recovery} |")
        if x["errors"]:
            lines += ["", "Errors: " + "; ".join(x["errors"])]
        lines.append("")
    md.write_text("\n".join(lines) + "\n" + NOTES_MARKER + notes)


if __name__ == "__main__":
    main()
