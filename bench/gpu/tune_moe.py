"""Tune the fused-MoE kernel configs on the GPU and write kernels/configs/*.json.

Legend: T tokens, K top-k, D hidden, I intermediate, S local slots, BM/BN/BK tiles.

For each benchmark shape and token count: every candidate config of each kernel is timed
alone (a CUDA graph replaying it over R routing instances, median of the replays), the
best gate_up and down per BLOCK_M are combined with the measured alignment and combine
times, and the GEMV variant (T <= 16) competes on its two kernels' total. The winner per
token count is written as SGLang-style JSON. Candidates are compiled first in parallel
processes (Triton's on-disk cache is shared), so the timing loop only hits the cache.

Run from the repo root:  PYTHONPATH=. python3 bench/gpu/tune_moe.py --out tune.json
With ``--merge --models M --tokens T...`` only those entries are re-tuned, against the config
each has now (timed in the same run), and the rest of the table is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_kernels as mk  # noqa: E402

from epserve.kernels.moe_align import align_by_slot  # noqa: E402
from epserve.kernels.moe_configs import (CONFIG_DIR, AlignedConfig, config_file_name,  # noqa: E402
                                 config_from_dict, config_to_dict)
from epserve.kernels.fused_moe import down_kernel, gate_up_kernel  # noqa: E402
from epserve.kernels.moe_down import combine, combine_sorted  # noqa: E402
from epserve.kernels.moe_gate_up import (GemmConfig, PersistentSplitTmaGemmConfig, SplitTmaGemmConfig,  # noqa: E402
                                 TmaGemmConfig, alignment_block)
from epserve.kernels.moe_gemv import GemvConfig, down_combine_gemv, gate_up_silu_gemv  # noqa: E402

GEMV_MAX_TOKENS = 16


def gemv_gate_up_candidates() -> list[GemvConfig]:
    return [GemvConfig(bn, bk, w) for bn in (4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8)]


def gemv_down_candidates() -> list[tuple[int, int, int, str]]:
    all_choices = [(bn, bk, w, "all_choices") for bn in (2, 4, 8) for bk in (128, 256, 512) for w in (4, 8)]
    per_choice = [(bn, bk, w, "per_choice") for bn in (4, 8, 16) for bk in (256, 512) for w in (4, 8)]
    return all_choices + per_choice


def gemm_candidates(bm: int, kind: str) -> list[GemmConfig]:
    if bm == 16:
        out = [GemmConfig(16, bn, bk, 1, 4, st) for bn in (32, 64, 128) for bk in (128, 256) for st in (3, 4)]
        out.append(GemmConfig(16, 64, 64, 1, 4, 5))
    elif bm == 32:
        out = [GemmConfig(32, bn, bk, 8, 4, st) for bn in (64, 128) for bk in (64, 128) for st in (3, 4)]
    elif bm == 64:
        out = [GemmConfig(64, bn, bk, 8, w, st) for bn in (64, 128) for bk in (64, 128)
               for w in (4, 8) for st in (3, 4)]
    else:
        out = [GemmConfig(128, bn, 64, 8, w, st) for bn in (64, 128) for w in (4, 8) for st in (3, 4)]
        out.append(GemmConfig(128, 128, 128, 8, 8, 3))
        if kind == "down":
            out += [GemmConfig(128, 256, 64, 8, 8, 3), GemmConfig(128, 256, 64, 8, 8, 4)]
    return out + [TmaGemmConfig(**asdict(c)) for c in out]


def split_candidates(bm: int, kind: str) -> list[SplitTmaGemmConfig]:
    return [SplitTmaGemmConfig(**asdict(c)) for c in gemm_candidates(bm, kind) if isinstance(c, TmaGemmConfig)]


def with_tma_store(configs: list, kind: str, bm: int) -> list:
    """Each TMA candidate again with its TMA-store epilogue (down: sorted rows; call 6), plus
    tiles that only fit once the scattered store's pointer tensor is gone (BK 128, 2 stages)."""
    tma = [c for c in configs if isinstance(c, TmaGemmConfig)]
    extra = []
    if bm == 128 and tma:
        cls = type(tma[0])
        if kind == "down":
            extra = [cls(128, 256, 128, 8, 8, 2), cls(128, 128, 128, 8, 8, 3), cls(128, 128, 64, 8, 8, 5),
                     cls(128, 256, 64, 4, 8, 4), cls(128, 256, 64, 16, 8, 4), cls(128, 128, 64, 1, 8, 4),
                     cls(128, 128, 64, 16, 8, 3), cls(128, 128, 64, 8, 8, 2), cls(128, 128, 64, 4, 8, 3),
                     cls(128, 256, 64, 1, 8, 4)]
        else:                  # deeper pipelines: 3 -> 4 stages was worth 7% at 4096 tokens (call 6)
            extra = [cls(128, 128, 128, 8, 8, 2), cls(128, 64, 128, 8, 8, 3), cls(128, 128, 64, 1, 8, 4),
                     cls(128, 128, 64, 16, 8, 4), cls(128, 128, 64, 8, 8, 5), cls(128, 128, 64, 1, 8, 5),
                     cls(128, 128, 64, 16, 8, 5), cls(128, 128, 32, 8, 8, 6), cls(128, 128, 32, 8, 8, 8),
                     cls(128, 64, 64, 8, 8, 5), cls(128, 64, 64, 8, 8, 6)]
    stored = [type(c)(**{**asdict(c), "tma_store": True}) for c in tma + extra]
    return configs + stored


def persistent_candidates(kind: str) -> list[GemmConfig]:
    """Family ``persist128`` (call 8): persistent split tiles (BM 128, TMA store), and the split
    configs the table holds at 1024-16384 tokens so a mix of the two can win."""
    P, S = PersistentSplitTmaGemmConfig, SplitTmaGemmConfig
    if kind == "down":
        return [P(128, 256, 64, 8, 8, 3, True), P(128, 256, 64, 8, 8, 4, True), P(128, 128, 64, 8, 8, 3, True),
                P(128, 128, 64, 8, 8, 4, True), P(128, 128, 64, 8, 8, 3, True, ctas_per_sm=2),
                P(128, 128, 64, 8, 8, 2, True, ctas_per_sm=2), P(128, 256, 64, 8, 8, 4, True, flatten=False),
                P(128, 128, 64, 8, 8, 3, True, ctas_per_sm=2, flatten=False), P(128, 256, 64, 1, 8, 3, True),
                S(128, 256, 64, 8, 8, 4, True), S(128, 128, 64, 8, 8, 3, True)]
    return [P(128, 128, 64, 1, 8, 4, True), P(128, 128, 64, 8, 8, 4, True), P(128, 128, 64, 8, 8, 3, True),
            P(128, 128, 64, 1, 8, 4, True, flatten=False), P(128, 64, 64, 8, 8, 4, True, ctas_per_sm=2),
            P(128, 128, 64, 1, 8, 4, False), S(128, 128, 64, 1, 8, 4, True), S(128, 128, 64, 8, 8, 4, True)]


def combine_for(down_cfg):
    """The combine matching a down config: by position for sorted rows, else by assignment."""
    if getattr(down_cfg, "tma_store", False):
        return lambda rows, inst, align: combine_sorted(rows, align.positions, *inst.slot_ids.shape)
    return lambda rows, inst, align: combine(rows, inst.slot_ids)


def run_gate_up(hidden, w13, align, top_k, cfg):
    return gate_up_kernel(cfg)(hidden, w13, align, top_k, cfg)


def run_down(act, w2, weights, align, cfg):
    return down_kernel(cfg)(act, w2, weights, align, cfg)


TMA_STORE_SEARCH = True
LABELS: set[str] | None = None        # --labels: search only these (e.g. split128)


def aligned_searches(shape: mk.Shape, num_tokens: int):
    """(label, alignment BLOCK_M, gate_up candidates, down candidates) to search."""
    bms = block_ms(shape, num_tokens)
    wrap = with_tma_store if TMA_STORE_SEARCH else (lambda c, kind, bm: c)
    for bm in bms:
        if LABELS is not None and f"bm{bm}" not in LABELS:
            continue
        yield (f"bm{bm}", bm, wrap(gemm_candidates(bm, "gate_up"), "gate_up", bm),
               wrap(gemm_candidates(bm, "down"), "down", bm))
    for bm in bms:
        if bm >= 64 and (LABELS is None or f"split{bm}" in LABELS):
            yield (f"split{bm}", bm // 2, wrap(split_candidates(bm, "gate_up"), "gate_up", bm),
                   wrap(split_candidates(bm, "down"), "down", bm))
    if 128 in bms and (LABELS is None or "persist128" in LABELS):
        yield "persist128", 64, persistent_candidates("gate_up"), persistent_candidates("down")


def block_ms(shape: mk.Shape, num_tokens: int) -> list[int]:
    rows_per_slot = num_tokens * shape.top_k / shape.num_experts      # expected local rows per slot
    if rows_per_slot <= 8:
        return [16]
    if rows_per_slot <= 32:
        return [16, 32, 64]
    if rows_per_slot <= 128:
        return [32, 64, 128]
    return [64, 128]


# ---- parallel precompile -------------------------------------------------------------------

def _compile_jobs(jobs: list[tuple]) -> list[str]:
    """Worker: launch each (shape, kind, config) once on a small problem to fill Triton's cache."""
    errors = []
    weights = {}
    for shape_name, kind, cfg in jobs:
        shape = mk.SHAPES[shape_name]
        if shape_name not in weights:
            weights[shape_name] = (
                torch.empty(shape.num_slots, 2 * shape.inter, shape.dim, device="cuda", dtype=torch.bfloat16).normal_(),
                torch.empty(shape.num_slots, shape.dim, shape.inter, device="cuda", dtype=torch.bfloat16).normal_())
        w13, w2 = weights[shape_name]
        inst = mk.make_instances(shape, 16, 1)[0]
        try:
            if kind == "gemv_gate_up":
                gate_up_silu_gemv(inst.hidden, w13, inst.slot_ids, cfg)
            elif kind == "gemv_down":
                act = torch.empty(inst.slot_ids.numel(), shape.inter, device="cuda", dtype=torch.bfloat16)
                down_combine_gemv(act, w2, inst.slot_ids, inst.weights, cfg)
            else:
                align = align_by_slot(inst.slot_ids, shape.num_slots, alignment_block(cfg))
                if kind == "gate_up":
                    run_gate_up(inst.hidden, w13, align, shape.top_k, cfg)
                else:
                    act = torch.zeros(align.sorted_ids.numel(), shape.inter, device="cuda", dtype=torch.bfloat16)
                    run_down(act, w2, inst.weights, align, cfg)
            torch.cuda.synchronize()
        except Exception as e:
            errors.append(f"{shape_name} {kind} {cfg}: {type(e).__name__}: {str(e)[:200]}")
    return errors


def precompile(shapes: list[mk.Shape], tokens: list[int], workers: int, incumbents=()) -> None:
    # The kernels specialise on no shape-dependent constexpr (EVEN_K holds for every candidate
    # block_k on both shapes), so one compile per (kind, config), on the first shape, serves all.
    jobs = set()
    compile_shape = shapes[0].name
    for shape in shapes:
        for t in tokens:
            if t <= GEMV_MAX_TOKENS:
                jobs.update((compile_shape, "gemv_gate_up", c) for c in gemv_gate_up_candidates())
                jobs.update((compile_shape, "gemv_down", GemvConfig(8, 512, 4, bn, bk, w, v))
                            for bn, bk, w, v in gemv_down_candidates())
            for _, _, gu_cands, dn_cands in aligned_searches(shape, t):
                jobs.update((compile_shape, "gate_up", c) for c in gu_cands)
                jobs.update((compile_shape, "down", c) for c in dn_cands)
    for cfg in incumbents:
        if isinstance(cfg, AlignedConfig):
            jobs.update({(compile_shape, "gate_up", cfg.gate_up), (compile_shape, "down", cfg.down)})
    jobs = sorted(jobs, key=str)
    chunks = [jobs[i::workers] for i in range(workers)]
    start = time.time()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for errors in pool.map(_compile_jobs, chunks):
            for e in errors:
                print("  compile:", e, flush=True)
    print(f"precompiled {len(jobs)} kernel configs in {time.time() - start:.0f}s with {workers} processes", flush=True)


# ---- timing -------------------------------------------------------------------------------

def time_each(fn_per_instance, count: int, reps: int) -> float:
    """Microseconds per instance of fn, from a graph holding all instances."""
    return mk.time_graph(lambda: [fn_per_instance(j) for j in range(count)], reps=reps) * 1e3 / count


def best_of(candidates, measure, deadline: float, label: str):
    best, best_us, results = None, float("inf"), []
    for cfg in candidates:
        if time.time() > deadline and best is not None:
            break
        try:
            us = measure(cfg)
        except Exception as e:
            results.append({"config": str(cfg), "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        results.append({"config": str(cfg), "us": us})
        if us < best_us:
            best, best_us = cfg, us
    print(f"    {label}: best {best_us:8.1f} us  {best}", flush=True)
    return best, best_us, results


def measure_aligned(shape: mk.Shape, insts, w13, w2, cfg: AlignedConfig, count: int, reps: int) -> dict:
    """Per-kernel microseconds of one aligned config (the same timing as the search)."""
    bm = cfg.align_block_m
    aligns = [align_by_slot(i.slot_ids, shape.num_slots, bm) for i in insts]
    parts = {"align_us": time_each(lambda j: align_by_slot(insts[j].slot_ids, shape.num_slots, bm), count, reps)}
    parts["gate_up_us"] = time_each(lambda j: run_gate_up(insts[j].hidden, w13, aligns[j], shape.top_k,
                                                          cfg.gate_up), count, reps)
    acts = [run_gate_up(i.hidden, w13, a, shape.top_k, cfg.gate_up) for i, a in zip(insts, aligns)]
    parts["down_us"] = time_each(lambda j: run_down(acts[j], w2, insts[j].weights, aligns[j], cfg.down), count, reps)
    rows = [run_down(a, w2, i.weights, al, cfg.down) for a, i, al in zip(acts, insts, aligns)]
    comb = combine_for(cfg.down)
    parts["combine_us"] = time_each(lambda j: comb(rows[j], insts[j], aligns[j]), count, reps)
    return parts


def tune_point(shape: mk.Shape, num_tokens: int, w13, w2, deadline: float, incumbent=None) -> dict:
    count = mk.num_instances(num_tokens)
    insts = mk.make_instances(shape, num_tokens, count)
    reps = 10 if num_tokens <= 1024 else 5
    log: dict = {"tokens": num_tokens, "candidates": {}}
    options: list[tuple[float, object, dict]] = []
    if num_tokens <= GEMV_MAX_TOKENS:
        gu, gu_us, res = best_of(
            gemv_gate_up_candidates(),
            lambda c: time_each(lambda j: gate_up_silu_gemv(insts[j].hidden, w13, insts[j].slot_ids, c), count, reps),
            deadline, "gemv gate_up")
        log["candidates"]["gemv_gate_up"] = res
        acts = [gate_up_silu_gemv(i.hidden, w13, i.slot_ids, gu) for i in insts]
        dn, dn_us, res = best_of(
            [GemvConfig(gu.block_n, gu.block_k, gu.num_warps, bn, bk, w, v)
             for bn, bk, w, v in gemv_down_candidates()],
            lambda c: time_each(lambda j: down_combine_gemv(acts[j], w2, insts[j].slot_ids, insts[j].weights, c),
                                count, reps),
            deadline, "gemv down+combine")
        log["candidates"]["gemv_down"] = res
        options.append((gu_us + dn_us, dn, {"gate_up_us": gu_us, "down_us": dn_us}))
    for label, align_bm, gu_cands, dn_cands in aligned_searches(shape, num_tokens):
        aligns = [align_by_slot(i.slot_ids, shape.num_slots, align_bm) for i in insts]
        align_us = time_each(lambda j: align_by_slot(insts[j].slot_ids, shape.num_slots, align_bm), count, reps)
        gu, gu_us, res = best_of(
            gu_cands,
            lambda c: time_each(lambda j: run_gate_up(insts[j].hidden, w13, aligns[j], shape.top_k, c), count, reps),
            deadline, f"{label} gate_up")
        log["candidates"][f"gate_up_{label}"] = res
        if gu is None:
            continue
        acts = [run_gate_up(i.hidden, w13, a, shape.top_k, gu) for i, a in zip(insts, aligns)]
        combine_cost: dict[bool, float] = {}

        def down_and_combine(c):
            # ranked with the combine its row layout needs (sorted rows: 12% more rows written)
            us = time_each(lambda j: run_down(acts[j], w2, insts[j].weights, aligns[j], c), count, reps)
            kind = bool(getattr(c, "tma_store", False))
            if kind not in combine_cost:
                rows = [run_down(a, w2, i.weights, al, c) for a, i, al in zip(acts, insts, aligns)]
                comb = combine_for(c)
                combine_cost[kind] = time_each(lambda j: comb(rows[j], insts[j], aligns[j]), count, reps)
            return us + combine_cost[kind]

        dn, dn_comb_us, res = best_of(dn_cands, down_and_combine, deadline, f"{label} down+combine")
        log["candidates"][f"down_{label}"] = res
        if dn is None:
            continue
        combine_us = combine_cost[bool(getattr(dn, "tma_store", False))]
        dn_us = dn_comb_us - combine_us
        total = align_us + gu_us + dn_us + combine_us
        print(f"    {label}: align {align_us:.1f} + gate_up {gu_us:.1f} + down {dn_us:.1f} + combine "
              f"{combine_us:.1f} = {total:.1f} us", flush=True)
        options.append((total, AlignedConfig(gu, dn), {"align_us": align_us, "gate_up_us": gu_us,
                                                       "down_us": dn_us, "combine_us": combine_us}))
    if incumbent is not None and isinstance(incumbent, AlignedConfig):
        parts = measure_aligned(shape, insts, w13, w2, incumbent, count, reps)
        total = sum(parts.values())
        print(f"    incumbent: {total:.1f} us {parts}", flush=True)
        options.append((total, incumbent, parts))
        log["incumbent"] = {"config": config_to_dict(incumbent), "total_us": total, "parts": parts}
    total, best, parts = min(options, key=lambda o: o[0])
    log.update(best=config_to_dict(best), total_us=total, parts=parts,
               options=[{"total_us": t, "config": config_to_dict(c), "parts": p} for t, c, p in options])
    print(f"  {shape.name} T={num_tokens}: {total:.1f} us  {config_to_dict(best)}", flush=True)
    return log


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tune.json")
    parser.add_argument("--models", nargs="+", default=list(mk.SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=mk.TOKENS)
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop trying candidates after this")
    parser.add_argument("--no-precompile", action="store_true")
    parser.add_argument("--merge", action="store_true",
                        help="keep the table's other entries, and let each tuned entry's current config "
                             "compete (timed in this run), so an entry only changes for a faster one")
    parser.add_argument("--labels", nargs="+", help="search only these families (bm64, split128, ...)")
    args = parser.parse_args()
    global LABELS
    LABELS = set(args.labels) if args.labels else None
    shapes = [mk.SHAPES[m] for m in args.models]
    device = torch.cuda.get_device_name()
    current = {}
    if args.merge:
        for shape in shapes:
            path = CONFIG_DIR / config_file_name(shape.num_slots, shape.dim, shape.inter, device)
            current[shape.name] = json.loads(path.read_text()) if path.exists() else {}
    if not args.no_precompile:
        incumbents = [config_from_dict(e) for table in current.values() for t, e in table.items()
                      if int(t) in args.tokens]
        precompile(shapes, args.tokens, args.workers, incumbents)
    deadline = time.time() + args.budget_s
    report = {"device": device, "points": {}, "tables": {}}
    CONFIG_DIR.mkdir(exist_ok=True)
    for shape in shapes:
        w13, w2 = mk.make_weights(shape)
        table = dict(current.get(shape.name, {}))
        for t in args.tokens:
            entry = table.get(str(t))
            try:
                log = tune_point(shape, t, w13, w2, deadline,
                                 config_from_dict(entry) if entry else None)
            except Exception as e:
                print(f"  {shape.name} T={t}: tuning FAILED {type(e).__name__}: {e}", flush=True)
                continue
            report["points"][f"{shape.name}/{t}"] = log
            table[str(t)] = log["best"]
            table = {k: table[k] for k in sorted(table, key=int)}
            name = config_file_name(shape.num_slots, shape.dim, shape.inter, device)
            (CONFIG_DIR / name).write_text(json.dumps(table, indent=1) + "\n")
            report["tables"][name] = table
            Path(args.out).write_text(json.dumps(report, indent=1))
            torch.cuda.empty_cache()
        del w13, w2
        torch.cuda.empty_cache()
    print(f"wrote {args.out} and {list(report['tables'])}", flush=True)


if __name__ == "__main__":
    main()
