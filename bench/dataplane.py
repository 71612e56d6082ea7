"""Data-plane benchmark: round-trip latency and throughput of ``--moe-a2a-backend torch`` (gloo).

Starts A attention ranks and W expert ranks as processes on 127.0.0.1. The experts' compute is
the identity (returns the tokens it got), so the numbers are the data plane's own cost: split,
pack, gloo send/recv both ways, expert-side receive threads, queue and batching, combine.
Both attention ranks run at once, like a deployment. For each T:

- latency: one micro-batch at a time, ``combine(dispatch(...))``; median and p90 per round trip,
  and the CPU time all processes spent per round trip (robust on a shared machine).
- ping-pong: two micro-batches in flight (dispatch mb0, dispatch mb1, combine mb0, combine mb1);
  tokens/s per attention rank and in total.
- local: the same split/combine with in-process experts (``--moe-a2a-backend local``), for the floor.

    .venv/bin/python bench/dataplane.py [--tokens 1 16 256] [--hidden 2048] [--top-k 8] [--slots 128]

Writes bench/results/dataplane_cpu.md. ``--probe-gloo-threads`` instead checks that one gloo
group survives concurrent send/recv from several threads (a fact the design does not rely on).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epserve.dataplane import BatchHeader, make_dispatcher, make_expert_server
from epserve.dataplane.torch_group import start_rendezvous_store


def identity_experts(header, hidden, local_slot_ids, weights):
    return hidden


def make_routing(seed: int, num_tokens: int, hidden_size: int, top_k: int, slots: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen).to(dtype)
    slot_ids = torch.rand(num_tokens, slots, generator=gen).topk(top_k, dim=1).indices     # [T, K]
    weights = torch.rand(num_tokens, top_k, generator=gen).softmax(dim=1)                  # [T, K] float32
    return hidden, slot_ids, weights


def iterations(num_tokens: int) -> int:
    return 300 if num_tokens <= 16 else 60


def time_rank(dispatcher, rank: int, args, barrier, results) -> dict:
    dtype = getattr(torch, args.dtype)
    slots_per_worker = args.slots // args.experts
    out = {}
    for t in args.tokens:
        batches = [make_routing(1000 * rank + i, t, args.hidden, args.top_k, args.slots, dtype) for i in range(4)]
        headers = [BatchHeader(1, i % 4, i % 2, t) for i in range(4)]

        def round_trip(i: int) -> torch.Tensor:
            return dispatcher.combine(dispatcher.dispatch(headers[i % 4], *batches[i % 4], slots_per_worker), 30)

        for i in range(10):
            round_trip(i)
        barrier.wait(120)
        if rank == 0:
            results.put(("mark", t, "start"))
        lat = []
        for i in range(iterations(t)):
            start = time.perf_counter()
            round_trip(i)
            lat.append(time.perf_counter() - start)
        barrier.wait(120)
        if rank == 0:
            results.put(("mark", t, "end"))
        pairs = iterations(t) // 2
        start = time.perf_counter()
        for i in range(pairs):
            p0 = dispatcher.dispatch(headers[0], *batches[0], slots_per_worker)
            p1 = dispatcher.dispatch(headers[1], *batches[1], slots_per_worker)
            dispatcher.combine(p0, 30)
            dispatcher.combine(p1, 30)
        pingpong_s = time.perf_counter() - start
        out[t] = {"lat": lat, "pingpong_tokens_per_s": 2 * pairs * t / pingpong_s}
    return out


def attention_main(rank: int, port: int, args, barrier, results) -> None:
    torch.set_num_threads(1)
    world = args.attention + args.experts
    dispatcher = make_dispatcher("torch", rank=rank, world_size=world, dist_init_addr=f"127.0.0.1:{port}",
                                 expert_ranks=list(range(args.attention, world)), timeout_s=60)
    results.put(("result", rank, time_rank(dispatcher, rank, args, barrier, results)))
    dispatcher.close()


def expert_main(rank: int, port: int, args, stop) -> None:
    torch.set_num_threads(1)
    world = args.attention + args.experts
    server = make_expert_server("torch", rank=rank, world_size=world, dist_init_addr=f"127.0.0.1:{port}",
                                attention_ranks=list(range(args.attention)), timeout_s=60)
    threading.Thread(target=lambda: (stop.get(), server.stop()), daemon=True).start()
    server.serve(identity_experts)


def local_floor(args) -> dict:
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    dispatcher = make_dispatcher("local", experts=[identity_experts] * args.experts)
    out = {}
    for t in args.tokens:
        batch = make_routing(7, t, args.hidden, args.top_k, args.slots, dtype)
        lat = []
        for i in range(10 + iterations(t)):
            start = time.perf_counter()
            dispatcher.combine(dispatcher.dispatch(BatchHeader(1, 0, 0, t), *batch, args.slots // args.experts), 1)
            lat.append(time.perf_counter() - start)
        out[t] = statistics.median(lat[10:])
    return out


def wire_bytes(args, num_tokens: int) -> tuple[int, int]:
    """Bytes one attention rank sends and receives per round trip (from its routing, both workers)."""
    from epserve.dataplane import split_by_worker

    dtype = getattr(torch, args.dtype)
    _, slot_ids, weights = make_routing(0, num_tokens, args.hidden, args.top_k, args.slots, dtype)
    shares = [s for s in split_by_worker(slot_ids, weights, args.slots // args.experts, args.experts) if s.num_tokens]
    sent = sum(512 + s.num_tokens * (args.hidden * dtype.itemsize + args.top_k * 12) for s in shares)
    received = sum(512 + s.num_tokens * args.hidden * dtype.itemsize for s in shares)
    return sent, received


def run(args) -> str:
    _store, port = start_rendezvous_store("127.0.0.1", 0)
    ctx = mp.get_context("spawn")
    results, barrier = ctx.Queue(), ctx.Barrier(args.attention)
    stops = [ctx.Queue() for _ in range(args.experts)]
    procs = [ctx.Process(target=attention_main, args=(r, port, args, barrier, results)) for r in range(args.attention)]
    procs += [ctx.Process(target=expert_main, args=(args.attention + w, port, args, stops[w]))
              for w in range(args.experts)]
    for p in procs:
        p.start()
    per_rank, cpu_at, cpu_ms = {}, {}, {}
    try:
        while len(per_rank) < args.attention:
            kind, key, value = results.get(timeout=900)
            if kind == "result":
                per_rank[key] = value
            elif value == "start":
                cpu_at[key] = cpu_seconds(procs)
            else:   # CPU time of all ranks per round trip of the latency phase
                cpu_ms[key] = 1e3 * (cpu_seconds(procs) - cpu_at[key]) / (iterations(key) * args.attention)
    finally:
        for q in stops:
            q.put("stop")
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    floor = local_floor(args)
    rows = []
    for t in args.tokens:
        lat = sorted(x for r in per_rank.values() for x in r[t]["lat"])
        tput = [r[t]["pingpong_tokens_per_s"] for r in per_rank.values()]
        sent, received = wire_bytes(args, t)
        median = statistics.median(lat)
        rows.append(f"| {t} | {1e3 * median:.2f} | {1e3 * lat[int(0.9 * (len(lat) - 1))]:.2f} | {cpu_ms[t]:.2f} | "
                    f"{1e3 * floor[t]:.3f} | {sum(tput):,.0f} | {min(tput):,.0f} | "
                    f"{(sent + received) / 2**20:.2f} | {(sent + received) / median / 2**30:.2f} |")
    return "\n".join(rows)


def cpu_seconds(procs) -> float:
    """User + system CPU seconds of the given processes so far (from /proc)."""
    total = 0.0
    for p in procs:
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python " \
           f"{platform.python_version()}, torch {torch.__version__}"


def probe_main(rank: int, port: int, n: int, results) -> None:
    """3 ranks on one gloo group; per rank 4 threads send/recv at once to/from two peers."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3)
    errors = []
    peers = [p for p in range(3) if p != rank]

    def send(dst: int) -> None:
        for i in range(n):
            size = 1 + (i * 7919) % 5000
            dist.send(torch.tensor([size]), dst=dst, tag=10 * rank + dst)
            dist.send(torch.full((size,), float(i), dtype=torch.float64), dst=dst, tag=10 * rank + dst)

    def recv(src: int) -> None:
        for i in range(n):
            size = torch.empty(1, dtype=torch.int64)
            dist.recv(size, src=src, tag=10 * src + rank)
            data = torch.empty(int(size), dtype=torch.float64)
            dist.recv(data, src=src, tag=10 * src + rank)
            if not torch.equal(data, torch.full_like(data, float(i))):
                errors.append(f"rank {rank}: message {i} from {src} corrupted")

    threads = [threading.Thread(target=f, args=(p,)) for p in peers for f in (send, recv)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    results.put((rank, time.perf_counter() - start, errors))


def probe_gloo_threads(n: int) -> None:
    _store, port = start_rendezvous_store("127.0.0.1", 0)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=probe_main, args=(r, port, n, results)) for r in range(3)]
    for p in procs:
        p.start()
    for _ in range(3):
        rank, seconds, errors = results.get(timeout=600)
        print(f"rank {rank}: 4 threads x {n} messages in {seconds:.1f}s, errors: {errors or 'none'}")
    for p in procs:
        p.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--slots", type=int, default=128)
    parser.add_argument("--attention", type=int, default=2)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dataplane_cpu.md")
    parser.add_argument("--append", action="store_true", help="add this run's section to --out instead of replacing it")
    parser.add_argument("--probe-gloo-threads", type=int, metavar="N", default=0,
                        help="only run the gloo thread-safety probe with N messages per thread")
    args = parser.parse_args()
    if args.probe_gloo_threads:
        probe_gloo_threads(args.probe_gloo_threads)
        return 0
    load_before = os.getloadavg()[0]
    table = run(args)
    load_after = os.getloadavg()[0]
    command = "python bench/dataplane.py " + " ".join(sys.argv[1:])
    text = f"""## {args.attention} attention + {args.experts} expert ranks, T = {', '.join(map(str, args.tokens))}

- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}
- machine: {machine()}; 1-minute load average {load_before:.1f} before, {load_after:.1f} after
  (the machine is shared: other jobs ran at the same time)
- command: `{command.strip()}`
- shape: D = {args.hidden}, K = {args.top_k}, P = {args.slots} slots, {args.attention} attention + {args.experts}
  expert ranks (processes on 127.0.0.1), hidden {args.dtype}, weights float32, random routing
  (nearly every token has slots on every worker). Expert compute is the identity: these are the
  data plane's own costs. All attention ranks run at once.

| T tokens | round trip median ms | p90 ms | CPU ms per round trip (all processes) | local backend ms | ping-pong tokens/s (all ranks) | ping-pong tokens/s (slowest rank) | MiB per round trip (one rank, both ways) | GiB/s at median |
|---|---|---|---|---|---|---|---|---|
{table}
"""
    if args.append and args.out.exists():
        text = args.out.read_text() + "\n" + text
    else:
        text = "# Data plane, torch backend (gloo) on CPU\n\n" + text
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
