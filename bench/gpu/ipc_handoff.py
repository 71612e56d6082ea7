"""Hand-off cost of one MoE layer's exchange between two processes on one GPU (cuda_ipc, issue 13).

An "attention" process and an "expert" process share one cuda_ipc channel (GPU buffers by CUDA
IPC handle, control words in host shared memory: ``epserve.dataplane.cuda_ipc_*``). One hand-off
= copy hidden [T, D] into the channel's input region → the expert copies it into the output
region (its "compute") → the attention side copies the partial out. Modes:

- ``flags``: device flags only (``cuda_ipc_flags``). Each side captures L layers of
  [copy in, signal, wait, copy out] / [wait, copy, signal] in a CUDA graph; a round is one
  host-announced step (the expert host polls one word, replays its graph) and one replay on the
  attention side. µs per hand-off = round time / L.
- ``events``: interprocess CUDA events with host waits, per layer: copy in, record, publish a
  sequence number; the expert host polls it, polls the event, copies, records, publishes; the
  attention host polls the reply and its event. µs per hand-off = L layers' time / L.
- ``local``: the same two copies in one process, no exchange (the data-movement floor).

Each setting runs without MPS, then with MPS when ``nvidia-cuda-mps-control`` exists: a
user-space daemon started with CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY in temp dirs
and stopped with ``quit`` at the end (no compute mode or other device setting is touched).
Without MPS the GPU time-slices between the two processes' contexts, so a spinning wait holds
the GPU until its timeslice ends: expect the flags mode to cost about a timeslice per layer there.

Run from the repository root (epserve need not be installed; ~1 minute):

    python3 bench/gpu/ipc_handoff.py --out bench/results/ipc_handoff_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from epserve.dataplane.cuda_ipc_flags import FLAG_STEP_STRIDE, signal_flag, spin_budget, wait_flag  # noqa: E402
from epserve.dataplane.cuda_ipc_layout import (ATTENTION_STATE, CTRL_BYTES, REQ_NUM_TOKENS, REQ_SEQ,  # noqa: E402
                                               RSP_SEQ, STEP_NUM_TOKENS, STEP_SEQ, AttentionState, Channel,
                                               ChannelShape, Flag)
from epserve.dataplane.cuda_ipc_memory import CudaSegment, HostSegment, IpcEvents  # noqa: E402
from epserve.mps import MpsUnavailable, UserMps  # noqa: E402

HIDDEN = 2048
DTYPE = torch.bfloat16
DEADLINE_S = 60.0


# ---- the two roles (child processes) ---------------------------------------------------------

def open_store(port: int):
    import torch.distributed as dist
    from datetime import timedelta

    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=DEADLINE_S))


def spin_until(condition, what: str) -> None:
    """Busy-poll (a benchmark: latency over CPU) with a deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {DEADLINE_S}s")


def capture(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    torch.cuda.synchronize()
    return graph


def compile_kernels(device: torch.device) -> None:
    """First launches compile; they must not happen inside a capture."""
    flag, counter, error = (torch.zeros(1, dtype=torch.int64, device=device) for _ in range(3))
    signal_flag(flag, counter, FLAG_STEP_STRIDE, 1)
    wait_flag(flag, counter, FLAG_STEP_STRIDE, 1, error, 1, 10)
    torch.cuda.synchronize()


def attention_role(args) -> None:
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    store = open_store(args.port)
    shape = ChannelShape(max(args.tokens), HIDDEN, 8, DTYPE)
    host = HostSegment.create(CTRL_BYTES, "bench")
    gpu = CudaSegment.create(shape.data_bytes, device)
    events = IpcEvents.create(2, device)
    channel = Channel(0, 0, 0, shape, host.tensor, gpu.tensor)
    channel.events = {Flag.REQUEST: events.events[0], Flag.REPLY: events.events[1]}
    store.set("attention", json.dumps({"ctrl": host.describe(), "data": gpu.describe(),
                                       "events": events.describe(device)}))
    store.wait(["expert_ready"])
    host.unlink()
    compile_kernels(device)
    words, header, layers = channel.words, channel.step_header(0), args.layers
    counter = torch.zeros(1, dtype=torch.int64, device=device)
    error = torch.zeros(1, dtype=torch.int64, device=device)
    budget = spin_budget(DEADLINE_S / 2, device)
    results = {"device": torch.cuda.get_device_name(device), "layers": layers, "rounds": args.rounds, "rows": []}
    step = 0
    for t in args.tokens:
        x = torch.randn(t, HIDDEN, device=device).to(DTYPE)
        out = torch.empty_like(x)

        def flags_layers() -> None:
            for layer in range(layers):
                channel.hidden[:t].copy_(x)
                signal_flag(channel.flag(Flag.STEP_IN), counter, FLAG_STEP_STRIDE, layer + 1)
                wait_flag(channel.flag(Flag.STEP_OUT), counter, FLAG_STEP_STRIDE, layer + 1, error, 1, budget)
                out.copy_(channel.partial[:t])

        def local_layers() -> None:
            for _ in range(layers):
                channel.hidden[:t].copy_(x)
                out.copy_(channel.hidden[:t])

        graph = capture(flags_layers)
        local = capture(local_layers)
        times = []
        for r in range(args.rounds + 2):
            step += 1
            channel.partial[:t].zero_()
            torch.cuda.synchronize()
            start = time.perf_counter()
            counter.fill_(step)
            header[STEP_NUM_TOKENS] = t          # one header entry: this bench's own protocol, no ring
            header[STEP_SEQ] = step
            graph.replay()
            torch.cuda.synchronize()
            if r >= 2:
                times.append((time.perf_counter() - start) / layers)
        flags_ok = torch.equal(out, x) and int(error.item()) == 0
        local_times = []
        for r in range(args.rounds + 2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            local.replay()
            torch.cuda.synchronize()
            if r >= 2:
                local_times.append((time.perf_counter() - start) / layers)
        event_times, events_ok = events_mode(channel, words, x, out, t, layers, args.rounds)
        results["rows"].append({"tokens": t, "flags_us": 1e6 * statistics.median(times),
                                "flags_min_us": 1e6 * min(times), "flags_ok": flags_ok,
                                "events_us": 1e6 * statistics.median(event_times),
                                "events_min_us": 1e6 * min(event_times), "events_ok": events_ok,
                                "local_copies_us": 1e6 * statistics.median(local_times)})
    words[ATTENTION_STATE] = AttentionState.CLOSED
    print("RESULT " + json.dumps(results), flush=True)


def events_mode(channel: Channel, words, x: torch.Tensor, out: torch.Tensor, t: int, layers: int,
                rounds: int) -> tuple[list[float], bool]:
    request, reply = channel.events[Flag.REQUEST], channel.events[Flag.REPLY]
    stream = torch.cuda.current_stream()
    times, ok = [], True
    seq = int(words[REQ_SEQ])
    for r in range(rounds + 2):
        channel.partial[:t].zero_()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(layers):
            seq += 1
            channel.hidden[:t].copy_(x)
            request.record(stream)
            words[REQ_NUM_TOKENS] = t
            words[REQ_SEQ] = seq
            spin_until(lambda: int(words[RSP_SEQ]) == seq, "the expert's reply")
            spin_until(reply.query, "the expert's reply event")
            out.copy_(channel.partial[:t])
        torch.cuda.synchronize()
        if r >= 2:
            times.append((time.perf_counter() - start) / layers)
        ok = ok and torch.equal(out, x)
    return times, ok


def expert_role(args) -> None:
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    store = open_store(args.port)
    store.wait(["attention"])
    desc = json.loads(store.get("attention"))
    host, gpu, events = HostSegment.open(desc["ctrl"]), CudaSegment.open(desc["data"]), IpcEvents.open(desc["events"])
    shape = ChannelShape(max(args.tokens), HIDDEN, 8, DTYPE)
    channel = Channel(0, 0, 0, shape, host.tensor, gpu.tensor)
    request, reply = events.events
    compile_kernels(device)
    counter = torch.zeros(1, dtype=torch.int64, device=device)
    error = torch.zeros(1, dtype=torch.int64, device=device)
    budget = spin_budget(DEADLINE_S / 2, device)
    graphs = {}
    for t in args.tokens:
        def expert_layers(t=t) -> None:
            for layer in range(args.layers):
                wait_flag(channel.flag(Flag.STEP_IN), counter, FLAG_STEP_STRIDE, layer + 1, error, 1, budget)
                channel.partial[:t].copy_(channel.hidden[:t])
                signal_flag(channel.flag(Flag.STEP_OUT), counter, FLAG_STEP_STRIDE, layer + 1)
        graphs[t] = capture(expert_layers)
    store.set("expert_ready", "1")
    words, header, stream = channel.words, channel.step_header(0), torch.cuda.current_stream()
    last_step, last_seq = int(header[STEP_SEQ]), int(words[REQ_SEQ])
    deadline = time.monotonic() + 10 * DEADLINE_S
    while int(words[ATTENTION_STATE]) != AttentionState.CLOSED and time.monotonic() < deadline:
        step, seq = int(header[STEP_SEQ]), int(words[REQ_SEQ])
        if step != last_step:
            last_step = step
            counter.fill_(step)
            graphs[int(header[STEP_NUM_TOKENS])].replay()
        if seq != last_seq:
            last_seq, t = seq, int(words[REQ_NUM_TOKENS])
            spin_until(request.query, "the attention's request event")
            channel.partial[:t].copy_(channel.hidden[:t])
            reply.record(stream)
            words[RSP_SEQ] = seq
    torch.cuda.synchronize()
    print("RESULT " + json.dumps({"device_errors": int(error.item())}), flush=True)


# ---- the driver (no CUDA here: MPS must be up before any context exists) ----------------------

def run_pair(args, env: dict) -> dict:
    """Start the expert and attention processes, wait for both; → the attention's results (or "error")."""
    from epserve.dataplane.torch_group import start_rendezvous_store

    store, port = start_rendezvous_store("127.0.0.1", 0)
    base = [sys.executable, __file__, "--port", str(port), "--layers", str(args.layers), "--rounds", str(args.rounds),
            "--tokens", *map(str, args.tokens)]
    with tempfile.TemporaryDirectory(prefix="epserve-ipc-bench-") as tmp:
        logs = {role: (open(Path(tmp) / f"{role}.out", "w+"), open(Path(tmp) / f"{role}.err", "w+"))
                for role in ("expert", "attention")}
        procs = {role: subprocess.Popen(base + ["--role", role], env=env, stdout=out, stderr=err, text=True)
                 for role, (out, err) in logs.items()}
        deadline, error = time.monotonic() + args.timeout_s, ""
        while any(p.poll() is None for p in procs.values()) and not error:
            failed = [role for role, p in procs.items() if p.poll() not in (None, 0)]
            if failed:
                error = f"{failed[0]} process failed (exit {procs[failed[0]].returncode})"
            elif time.monotonic() > deadline:
                error = f"timed out after {args.timeout_s}s"
            time.sleep(0.1)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        outputs = {}
        for role, (out, err) in logs.items():
            out.seek(0)
            err.seek(0)
            lines = [line for line in out.read().splitlines() if line.startswith("RESULT ")]
            if lines:
                outputs[role] = json.loads(lines[-1][len("RESULT "):])
            else:
                error = error or f"{role} reported nothing"
                error += f"\n--- {role} stderr ---\n{err.read()[-3000:]}"
    del store
    if error:
        return {"error": error}
    result = outputs["attention"]
    result["expert_device_errors"] = outputs["expert"]["device_errors"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 32, 128])
    parser.add_argument("--layers", type=int, default=16, help="hand-offs per round (per graph replay)")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per mode and T (after 2 warm-up)")
    parser.add_argument("--no-mps", action="store_true", help="skip the MPS run")
    parser.add_argument("--timeout-s", type=float, default=150.0, help="per setting")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--role", choices=["attention", "expert"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "attention":
        return attention_role(args)
    if args.role == "expert":
        return expert_role(args)

    env = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}
    settings = {"no_mps": {"note": "default pipe /tmp/nvidia-mps exists: a system MPS daemon may serve this run"
                           if Path("/tmp/nvidia-mps").exists() else "no MPS daemon", **run_pair(args, env)}}
    if not args.no_mps:
        mps = UserMps()
        try:
            mps_env = mps.start()
        except MpsUnavailable as e:
            settings["mps"] = {"note": str(e), "error": "not run"}
        else:
            try:
                settings["mps"] = {"note": f"user-space daemon in {mps.folder}", **run_pair(args, mps_env)}
            finally:
                mps.stop()
    print(f"{'setting':8s} {'T':>5s} {'flags µs':>10s} {'(min)':>8s} {'events µs':>10s} {'(min)':>8s} "
          f"{'local µs':>9s}  ok   (per hand-off: D={HIDDEN} bf16, {args.layers} layers per round, median of "
          f"{args.rounds} rounds)")
    for name, result in settings.items():
        if "error" in result:
            print(f"{name:8s} {result['error'][:200]}  [{result['note']}]")
            continue
        for row in result["rows"]:
            ok = row["flags_ok"] and row["events_ok"] and result["expert_device_errors"] == 0
            print(f"{name:8s} {row['tokens']:5d} {row['flags_us']:10.1f} {row['flags_min_us']:8.1f} "
                  f"{row['events_us']:10.1f} {row['events_min_us']:8.1f} {row['local_copies_us']:9.1f}  "
                  f"{'yes' if ok else 'NO'}")
        print(f"{'':8s} {result['device']}; {result['note']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"hidden": HIDDEN, "dtype": "bfloat16", "settings": settings},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
