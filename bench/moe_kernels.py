"""Benchmark the MoE runner backends on one GPU against ceilings measured in the same run.

Legend: T tokens, K top-k, D hidden, I intermediate, S local slots, E experts routed over.

Run from the repo root on the GPU machine:
    PYTHONPATH=. python3 bench/moe_kernels.py --out-dir bench/results
    PYTHONPATH=. python3 bench/moe_kernels.py --models DeepSeek-V3 --name moe_kernels_deepseek_v3_h200

Shapes (``--models``; the default runs the first two): Qwen3-30B-A3B (all 128 experts local),
DeepSeek-V3-EP8 (one EP8 shard: 32 of 256 experts local), DeepSeek-V3 (a whole MoE layer on one GPU,
256 experts top-8, hidden 7168, expert width 2048: 21 GiB of bf16 weights, as the colocated
``bench/serve_gpu.py --model deepseek-v3`` runs it).

Accounting (the same for every backend, and as FACTS.md's anchors):
- routing: uniform random top-K over E experts; slot s holds expert s, so on the
  DeepSeek-V3 EP8 shard (S=32 of E=256) ~7/8 of choices are -1. At T=1 on that shard each
  instance has exactly one local choice (the expected count).
- bytes = weights of the local experts hit (3·D·I·2 each) + input (T·D·2) + output (T·D·2);
  flops = 6 · local assignments · D · I.
- R routing instances with different experts run back to back inside one timed region
  (so no weight is served from L2 by the previous run) and time is divided by R.
- ``time_us``: the whole ``MoERunner.run`` (for triton: alignment + GEMMs + combine).
  ``time_no_pdl_us`` (triton, graph): the same with plain launches instead of programmatic
  dependent launch (kernels/pdl.py), timed in the same run.
  ``time_kernels_us`` (triton): without the alignment step, like SGLang's kernel-only anchors.
- Backends without host syncs (triton) are replayed from a CUDA graph at every T, as
  FACTS.md's SGLang anchors were; for T > 256 (prefill, which a server runs eagerly) the
  eager time, Python launch overhead included, is recorded too (``time_eager_us``). The
  torch reference syncs with the host, so it always runs eagerly.
- ceilings: device-to-device copy bandwidth (bytes read + written) and a dense bf16
  8192^3 matmul, measured at the start and at the end; the higher of each is used. The
  matmul is measured twice: a burst of 10 (``matmul_bf16_tflops``, the roofline's peak) and
  sustained, the last 300 of ~700 back-to-back (~1 s; ``matmul_bf16_sustained_tflops``).
  Under the H200's 700 W cap the clock falls during sustained bf16 GEMMs (1980 → ~1450-1600
  MHz seen on 2026-11-29, "SW power cap"), and every timed MoE run here is sustained, so
  ``frac_of_roofline_sustained`` (the same roofline with the sustained peak) is given too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
GRAPH_MAX_TOKENS = 256
DEVICE = "cuda"
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Shape:
    name: str
    num_slots: int      # S local slots (slot s = expert s)
    num_experts: int    # E experts routed over
    dim: int            # D
    inter: int          # I
    top_k: int          # K


SHAPES = {
    "Qwen3-30B-A3B": Shape("Qwen3-30B-A3B", 128, 128, 2048, 768, 8),
    "DeepSeek-V3-EP8": Shape("DeepSeek-V3-EP8", 32, 256, 7168, 2048, 8),
    "DeepSeek-V3": Shape("DeepSeek-V3", 256, 256, 7168, 2048, 8),
}
DEFAULT_MODELS = ["Qwen3-30B-A3B", "DeepSeek-V3-EP8"]     # the recorded table's; DeepSeek-V3 on request


@dataclass
class Instance:
    hidden: torch.Tensor      # [T, D]
    slot_ids: torch.Tensor    # [T, K] int32
    weights: torch.Tensor     # [T, K] float32
    assignments: int          # local assignments
    experts_hit: int
    bytes: int
    flops: int


def num_instances(num_tokens: int) -> int:
    return 8 if num_tokens <= 256 else (4 if num_tokens <= 1024 else 2)


def make_weights(shape: Shape, dtype=None, seed: int = 0):
    dtype = dtype or DTYPE
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w13 = (torch.randn(shape.num_slots, 2 * shape.inter, shape.dim, device=DEVICE, generator=g)
           / shape.dim ** 0.5).to(dtype)
    w2 = (torch.randn(shape.num_slots, shape.dim, shape.inter, device=DEVICE, generator=g)
          / shape.inter ** 0.5).to(dtype)
    return w13, w2


def make_instances(shape: Shape, num_tokens: int, count: int, dtype=None,
                   seed: int = 1) -> list[Instance]:
    dtype = dtype or DTYPE
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1000 * num_tokens)
    out = []
    while len(out) < count:
        scores = torch.rand(num_tokens, shape.num_experts, device=DEVICE, generator=g)
        weights, experts = scores.topk(shape.top_k, dim=1)
        weights = weights / weights.sum(1, keepdim=True)
        slot_ids = torch.where(experts < shape.num_slots, experts, -1).to(torch.int32)
        local = slot_ids[slot_ids >= 0]
        if num_tokens == 1 and shape.num_slots < shape.num_experts and local.numel() != 1:
            continue                      # the expected one local choice per token
        hidden = torch.randn(num_tokens, shape.dim, device=DEVICE, generator=g).to(dtype)
        hit = int(torch.unique(local).numel())
        elem = torch.finfo(dtype).bits // 8
        nbytes = hit * 3 * shape.dim * shape.inter * elem + 2 * num_tokens * shape.dim * elem
        out.append(Instance(hidden, slot_ids.contiguous(), weights.float().contiguous(),
                            int(local.numel()), hit, nbytes,
                            6 * int(local.numel()) * shape.dim * shape.inter))
    return out


def _median_ms(run_once, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_once()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_eager(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of fn() (CUDA events; fn may sync with the host)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return _median_ms(fn, reps)


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """A CUDA graph holding fn()'s launches (fn runs twice on a side stream first: compiles,
    allocator warm-up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def interleaved_medians(graphs: dict, per_replay: int, rounds: int, reps: int) -> dict:
    """A/B timing: the graphs replayed in turn, round after round (each: one warm replay, then
    the median of ``reps``); per graph the median over rounds, in µs per ``per_replay`` item."""
    times = {key: [] for key in graphs}
    for _ in range(rounds):
        for key, graph in graphs.items():
            graph.replay()
            torch.cuda.synchronize()
            times[key].append(_median_ms(graph.replay, reps) * 1e3 / per_replay)
    return {key: statistics.median(t) for key, t in times.items()}


def time_graph(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of one replay of a CUDA graph holding fn()'s launches."""
    graph = capture_graph(fn)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    ms = _median_ms(graph.replay, reps)
    del graph
    return ms


def measure_ceilings() -> dict:
    n = 1 << 30                                                        # 2 GiB of bf16
    src = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_eager(lambda: dst.copy_(src), reps=10, warmup=3)
    copy_tb_s = 2 * n * 2 / (ms * 1e-3) / 1e12
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
    ms = time_eager(lambda: a @ b, reps=10, warmup=3)
    mm_tflops = 2 * m ** 3 / (ms * 1e-3) / 1e12
    for _ in range(400):                                               # ~0.6 s: into the power cap
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(300):
        a @ b
    end.record()
    end.synchronize()
    sustained = 2 * m ** 3 * 300 / (start.elapsed_time(end) * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_tb_per_s": copy_tb_s, "matmul_bf16_tflops": mm_tflops,
            "matmul_bf16_sustained_tflops": sustained}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def triton_kernels_only(shape: Shape, num_tokens: int, instances, w13, w2):
    """The triton runner's work without the alignment step (alignment done once, outside)."""
    from epserve.kernels.fused_moe import experts_aligned, fused_moe_gemv
    from epserve.kernels.moe_align import align_by_slot
    from epserve.kernels.moe_configs import AlignedConfig, get_config
    config = get_config(num_tokens, shape.top_k, shape.num_slots, shape.dim, shape.inter,
                        torch.cuda.get_device_name())
    if not isinstance(config, AlignedConfig):
        return (lambda: [fused_moe_gemv(i.hidden, i.slot_ids, i.weights, w13, w2, config)
                         for i in instances]), config, None
    aligns = [align_by_slot(i.slot_ids, shape.num_slots, config.align_block_m) for i in instances]
    padded = sum(int(a.slot_offsets[-1]) for a in aligns)
    padding = padded / max(sum(i.assignments for i in instances), 1) - 1

    def run():
        for inst, al in zip(instances, aligns):
            experts_aligned(inst.hidden, inst.slot_ids, inst.weights, w13, w2, al, config)
    return run, config, padding


def bench_point(shape: Shape, num_tokens: int, backend: str, runner, instances, w13, w2,
                ceilings: dict, reference: torch.Tensor | None) -> dict:
    graphable = backend != "torch"

    def run_all():
        for inst in instances:
            runner.run(inst.hidden, inst.slot_ids, inst.weights, w13, w2)

    reps = 20 if num_tokens <= 1024 else 8
    timing = "graph" if graphable else "eager"
    try:
        ms = time_graph(run_all, reps) if graphable else time_eager(run_all, reps)
    except Exception as e:                                           # graph capture refused
        print(f"  {backend}: graph failed ({type(e).__name__}: {e}); timing eagerly", flush=True)
        timing = "eager"
        ms = time_eager(run_all, reps)
    count = len(instances)
    row = _row(shape, num_tokens, backend, ms / count, instances, ceilings)
    row["timing"] = timing
    if graphable and num_tokens > GRAPH_MAX_TOKENS:
        row["time_eager_us"] = time_eager(run_all, reps) / count * 1e3
    if backend == "triton" and timing == "graph":
        from epserve.kernels import pdl
        with pdl.disabled():
            row["time_no_pdl_us"] = time_graph(run_all, reps) / count * 1e3
    first = instances[0]
    out = runner.run(first.hidden, first.slot_ids, first.weights, w13, w2)
    if reference is not None:
        row["rel_err_vs_torch"] = rel_err(out, reference)
    if backend == "triton":
        fn, config, padding = triton_kernels_only(shape, num_tokens, instances, w13, w2)
        if padding is not None:
            row["padding_rows_frac"] = padding       # padded GEMM rows / real rows - 1
        kms = (time_graph(fn, reps) if graphable else time_eager(fn, reps)) / count
        from epserve.kernels.moe_configs import config_to_dict
        row["config"] = config_to_dict(config)
        row["variant"] = row["config"]["variant"]
        row["time_kernels_us"] = kms * 1e3
        set_fractions(row, ceilings)
    return row


def _row(shape, num_tokens, backend, ms, instances, ceilings) -> dict:
    row = {"model": shape.name, "tokens": num_tokens, "backend": backend, "time_us": ms * 1e3,
           "bytes": sum(i.bytes for i in instances) / len(instances),
           "flops": sum(i.flops for i in instances) / len(instances),
           "local_assignments": sum(i.assignments for i in instances) / len(instances),
           "experts_hit": sum(i.experts_hit for i in instances) / len(instances)}
    return set_fractions(row, ceilings)


def set_fractions(row: dict, ceilings: dict) -> dict:
    """Throughputs and fractions of the ceilings, for the whole run and for kernels only."""
    bw, peak = ceilings["copy_tb_per_s"] * 1e12, ceilings["matmul_bf16_tflops"] * 1e12
    roofline = max(row["bytes"] / bw, row["flops"] / peak)
    row["roofline_us"] = roofline * 1e6
    row["bound"] = "memory" if row["bytes"] / bw >= row["flops"] / peak else "compute"
    row["copy_tb_per_s_ceiling"] = ceilings["copy_tb_per_s"]
    row["matmul_tflops_ceiling"] = ceilings["matmul_bf16_tflops"]
    sustained_peak = ceilings.get("matmul_bf16_sustained_tflops", ceilings["matmul_bf16_tflops"]) * 1e12
    roofline_sustained = max(row["bytes"] / bw, row["flops"] / sustained_peak)
    row["matmul_sustained_tflops_ceiling"] = sustained_peak / 1e12
    for suffix, key in (("", "time_us"), ("_kernels", "time_kernels_us")):
        if key not in row:
            continue
        sec = row[key] * 1e-6
        row[f"tb_per_s{suffix}"] = row["bytes"] / sec / 1e12
        row[f"tflops{suffix}"] = row["flops"] / sec / 1e12
        row[f"frac_of_bw{suffix}"] = row["bytes"] / sec / bw
        row[f"frac_of_flops{suffix}"] = row["flops"] / sec / peak
        row[f"frac_of_roofline{suffix}"] = roofline / sec
        row[f"frac_of_roofline_sustained{suffix}"] = roofline_sustained / sec
    return row


def make_runners(backends: list[str]) -> dict:
    from epserve.moe_runner import make_moe_runner
    runners = {}
    for name in backends:
        try:
            runners[name] = make_moe_runner(name, DEVICE)
        except Exception as e:
            print(f"backend {name} unavailable: {type(e).__name__}: {e}", flush=True)
    return runners


def write_markdown(path: Path, rows: list[dict], meta: dict) -> None:
    lines = [f"# MoE kernels on {meta['device']}", "",
             f"- date: {meta['date']}", f"- command: `{meta['command']}`",
             f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}",
             f"- ceilings measured in this run (start / end; the higher is used): copy "
             f"{meta['ceilings_start']['copy_tb_per_s']:.2f} / {meta['ceilings_end']['copy_tb_per_s']:.2f} TB/s, "
             f"bf16 matmul {meta['ceilings_start']['matmul_bf16_tflops']:.0f} / "
             f"{meta['ceilings_end']['matmul_bf16_tflops']:.0f} TFLOP/s in a burst, "
             f"{meta['ceilings_start']['matmul_bf16_sustained_tflops']:.0f} / "
             f"{meta['ceilings_end']['matmul_bf16_sustained_tflops']:.0f} TFLOP/s sustained (~1 s, at the power cap); "
             "`frac roofline` uses the burst peak, `sust.` the sustained one",
             "- accounting: see the docstring of bench/moe_kernels.py (bytes = local experts hit + in + out; "
             "flops = 6·local assignments·D·I; roofline = max(bytes/BW, flops/peak)); "
             "`kern` columns leave out the alignment step, like SGLang's kernel-only anchors", "",
             "| model | T | backend | timing | µs | kern µs | TB/s | TFLOP/s | frac BW | frac FLOP | "
             "frac roofline | kern frac roofline | sust. frac roofline | bound | rel err vs torch | variant | pad rows | "
             "eager µs | no-PDL µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kern = f"{r['time_kernels_us']:.1f}" if "time_kernels_us" in r else ""
        kfr = f"{r['frac_of_roofline_kernels']:.2f}" if "frac_of_roofline_kernels" in r else ""
        err = f"{r['rel_err_vs_torch']:.1e}" if "rel_err_vs_torch" in r else ""
        lines.append(f"| {r['model']} | {r['tokens']} | {r['backend']} | {r['timing']} | {r['time_us']:.1f} | "
                     f"{kern} | {r['tb_per_s']:.2f} | {r['tflops']:.0f} | {r['frac_of_bw']:.2f} | "
                     f"{r['frac_of_flops']:.2f} | {r['frac_of_roofline']:.2f} | {kfr} | "
                     f"{r['frac_of_roofline_sustained']:.2f} | {r['bound']} | "
                     f"{err} | {r.get('variant', '')} | "
                     f"{'' if 'padding_rows_frac' not in r else format(r['padding_rows_frac'], '.0%')} | "
                     f"{'' if 'time_eager_us' not in r else format(r['time_eager_us'], '.1f')} | "
                     f"{'' if 'time_no_pdl_us' not in r else format(r['time_no_pdl_us'], '.1f')} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for backend in sorted({r["backend"] for r in rows}):
            pts = sorted((r["tokens"], r["frac_of_roofline"]) for r in rows
                         if r["model"] == model and r["backend"] == backend)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend)
        kern = sorted((r["tokens"], r["frac_of_roofline_kernels"]) for r in rows
                      if r["model"] == model and "frac_of_roofline_kernels" in r)
        if kern:
            ax.plot(*zip(*kern), marker="x", linestyle="--", label="triton (kernels only)")
        sust = sorted((r["tokens"], r["frac_of_roofline_sustained"]) for r in rows
                      if r["model"] == model and r["backend"] == "triton")
        if sust:
            ax.plot(*zip(*sust), marker=".", linestyle=":", label="triton (sustained matmul peak)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.axhline(0.9, color="grey", linewidth=0.5)
        ax.axhline(0.6, color="grey", linewidth=0.5)
        ax.set_title(model)
        ax.set_xlabel("tokens")
        ax.set_ylabel("fraction of roofline (max(bytes/BW, flops/peak) / time)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("--name", default="moe_kernels_h200")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    parser.add_argument("--backends", nargs="+", default=["triton", "torch", "deep_gemm"])
    args = parser.parse_args(argv)
    import triton
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runners = make_runners(args.backends)
    ceil_start = measure_ceilings()
    print(f"ceilings: {ceil_start}", flush=True)
    rows: list[dict] = []
    for model in args.models:
        shape = SHAPES[model]
        w13, w2 = make_weights(shape)
        for num_tokens in args.tokens:
            instances = make_instances(shape, num_tokens, num_instances(num_tokens))
            first = instances[0]
            reference = None
            if "torch" in runners:
                reference = runners["torch"].run(first.hidden, first.slot_ids, first.weights, w13, w2)
            for name, runner in runners.items():
                try:
                    row = bench_point(shape, num_tokens, name, runner, instances, w13, w2,
                                      ceil_start, reference if name != "torch" else None)
                except Exception as e:
                    print(f"{model} T={num_tokens} {name}: FAILED {type(e).__name__}: {e}", flush=True)
                    continue
                rows.append(row)
                print(f"{model:16s} T={num_tokens:6d} {name:9s} {row['time_us']:9.1f} us "
                      f"kern {row.get('time_kernels_us', float('nan')):9.1f} us  "
                      f"BW {row['frac_of_bw']:.2f} FLOP {row['frac_of_flops']:.2f} "
                      f"roof {row['frac_of_roofline']:.2f} sust {row['frac_of_roofline_sustained']:.2f} ({row['bound']}) "
                      f"no-PDL {row.get('time_no_pdl_us', float('nan')):9.1f} us "
                      f"err {row.get('rel_err_vs_torch', 0):.1e} {row.get('variant', '')}", flush=True)
            del instances, reference
            torch.cuda.empty_cache()
        del w13, w2
        torch.cuda.empty_cache()
    ceil_end = measure_ceilings()
    ceilings = {k: max(ceil_start[k], ceil_end[k]) for k in ceil_start}
    for r in rows:
        set_fractions(r, ceilings)
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "PYTHONPATH=. python3 " + " ".join(["bench/moe_kernels.py", *(argv or sys.argv[1:])]),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "host": platform.node(), "ceilings_start": ceil_start, "ceilings_end": ceil_end,
            "ceilings_used": ceilings}
    for r in rows:
        r.update(device=meta["device"], date=meta["date"])
    (out_dir / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    write_markdown(out_dir / f"{args.name}.md", rows, meta)
    try:
        plot(out_dir / f"{args.name}.png", rows)
    except Exception as e:
        print(f"plot failed: {e}", flush=True)
    print(f"wrote {out_dir}/{args.name}.{{json,md,png}}", flush=True)


if __name__ == "__main__":
    main()
