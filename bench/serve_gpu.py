"""One GPU, end to end: decode speed and time to first token against the memory roofline.

Run from the repository root on the GPU machine (epserve need not be installed):
    PYTHONPATH=. python3 bench/serve_gpu.py --out-dir bench/results [--layers 48] [--modes colocated transformers]
    PYTHONPATH=. python3 bench/serve_gpu.py --model deepseek-v3 --out-dir bench/results [--layers 4]

Models (``--model``), bf16, dummy weights drawn on the device (``--load-format dummy``):
- ``qwen3-30b-a3b`` (default): Qwen3-30B-A3B's shape (hidden 2048, 48 layers, GQA 32q/4kv, head 128,
  128 experts top-8, expert width 768, vocab 151936);
- ``deepseek-v3``: DeepSeek-V3's layer shape (hidden 7168, MLA with 128 heads, q_lora_rank 1536,
  kv_lora_rank 512, rope 64, nope/value 128, YaRN factor 40; 256 routed experts top-8 in 8 groups of
  which 4 are kept, expert width 2048, one shared expert; dense width 18432; vocab 129280) with fewer
  layers: ``--layers`` (default 4) of which the first ``--dense-layers`` (default 1; the model has 3 of
  61) are dense. Each MoE layer holds 21 GiB of bf16 experts: 4 layers need 69 GiB of weights (an
  H200; ``--layers 3``, 46 GiB, on an H100). Attention runs the Triton MLA kernels (kernels/mla_attention.py).
  Colocated mode only (the transformers row copies Qwen3's weight layout).

Modes (rows of the result table, in the same run):
- ``colocated``: epserve's engine with attention and all experts in this process
  (``--moe-a2a-backend local``): Triton paged attention, decode steps replayed from CUDA graphs,
  GPU sampling. Measured through ``Engine.step`` — scheduler, metadata, sampling and the host
  copy of the tokens included — as a server runs it, with the overlap schedule (the next decode step
  queued before the host reads the last one's tokens); ``--overlap-ab`` times each batch without it too.
- ``transformers``: ``AutoModelForCausalLM.generate`` (greedy) with the same weights copied in.
- ``cuda_ipc``: one attention process + one expert process on this GPU (``epserve up --moe-a2a-backend
  cuda_ipc --mps on``: the step path on device flags, both under a user-space MPS daemon), measured
  through the gateway against the colocated deployment (``--moe-a2a-backend local``) the same way
  (``bench/serve_deployed.py``: every stream's decode step, median over streams; ``--deployed-new-tokens``
  each). Its row carries ``vs_colocated_deployed`` (tokens/s ratio, like for like) and the colocated
  deployment's step; its roofline is the ``colocated`` row's bytes of that batch. Runs after the
  in-process modes, in processes of its own.

Per batch size B (prompt ``--prompt-len`` random tokens each, greedy, EOS ignored):
- ``step_ms``: median decode step (colocated: every step of the run once all prompts are in;
  transformers: (time for 1 + N new tokens - time for 1) / N);
- ``tok_per_s`` = B / step;
- ``roofline_frac`` = (bytes a decode step must read at least / copy bandwidth measured in this
  run) / step, where bytes = dense weights (attention, router, norms, lm_head; B rows of the
  embedding) + the experts the step's routing hits (counted per layer from one step's routing) +
  the KV cache read (every sequence's context, all layers, at the run's mean context).
And TTFT of one ``--ttft-prompt``-token prompt (prefill plus the first token).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 40960,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False,
    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "attention_bias": False,
    "attention_dropout": 0.0, "initializer_range": 0.02, "output_router_logits": False,
    "router_aux_loss_coef": 0.001, "sliding_window": None, "use_sliding_window": False, "torch_dtype": "bfloat16",
}


DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "max_position_embeddings": 163840, "rope_theta": 10000, "rope_interleave": True,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
    "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "num_nextn_predict_layers": 0,
    "torch_dtype": "bfloat16",
}
# --model: (config, default --layers, its name in the record, default --name)
MODELS = {"qwen3-30b-a3b": (QWEN3_30B_A3B, 48, "Qwen3-30B-A3B", "serve_gpu_h200"),
          "deepseek-v3": (DEEPSEEK_V3, 4, "DeepSeek-V3", "serve_gpu_deepseek_v3_h200")}


def write_model_dir(model: str, layers: int, dense_layers: int | None = None) -> Path:
    model_dir = Path(tempfile.mkdtemp(prefix="serve_gpu_"))
    config = dict(MODELS[model][0], num_hidden_layers=layers)
    if dense_layers is not None:
        config["first_k_dense_replace"] = dense_layers
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": config["eos_token_id"]}))
    return model_dir


def copy_bandwidth(device: str = "cuda", nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times[5:])


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


# -- accounting -------------------------------------------------------------------------------
def dense_bytes(spec, batch: int) -> int:
    """Every checkpoint tensor but the routed experts and the embedding (attention, norms, routers, dense
    and shared MLPs, lm_head), bf16, plus B rows of the embedding."""
    from epserve.dummy_weights import checkpoint_shapes

    numel = sum(math.prod(shape) for name, shape in checkpoint_shapes(spec).items()
                if ".mlp.experts." not in name and name != "model.embed_tokens.weight")
    return numel * 2 + batch * spec.hidden_size * 2


def expert_bytes(spec, experts_hit: int) -> int:
    return experts_hit * 3 * spec.hidden_size * spec.moe_intermediate_size * 2


def kv_bytes(spec, total_context: int) -> int:
    """GQA: a key and a value per KV head; MLA: the latent and the rotary key (C + Dr values)."""
    per_token_layer = spec.mla.cache_width if spec.mla is not None else 2 * spec.num_key_value_heads * spec.head_dim
    return total_context * spec.num_hidden_layers * per_token_layer * 2


# -- epserve, colocated --------------------------------------------------------------------------
def run_colocated(model_dir: Path, batches: list[int], prompt_len: int, new_tokens: int, ttft_prompt: int,
                  bandwidth: float, log, overlap_ab: bool = False) -> tuple[list[dict], dict]:
    """``overlap_ab``: each batch also without the overlap schedule (``engine.overlap`` off), right after."""
    from epserve.attention_worker.colocated import build_colocated_engine
    from epserve.attention_worker.engine import EngineLimits
    from epserve.attention_worker.sampler import SamplingParams

    max_bs = max(batches)
    context = prompt_len + new_tokens
    blocks = max_bs * -(-context // 16) + -(-ttft_prompt // 16) + 64
    limits = EngineLimits(num_kv_blocks=blocks, kv_block_size=16, max_num_batched_tokens=max(8192, ttft_prompt),
                          max_num_seqs=max_bs, num_micro_batches=1, cuda_graph_max_bs=max_bs)
    start = time.perf_counter()
    engine = build_colocated_engine(str(model_dir), torch.bfloat16, "cuda", "auto", limits,
                                    max_context=max(context, ttft_prompt) + 16, load_format="dummy")
    torch.cuda.synchronize()
    setup_s = time.perf_counter() - start
    log(f"colocated engine ready in {setup_s:.1f} s (dummy weights + CUDA graph capture)")
    spec = engine.model.spec
    rows = []
    overlap = engine.overlap
    for batch, overlap_schedule in [(b, o) for b in batches for o in ([True, False] if overlap_ab else [True])]:
        engine.overlap = overlap and overlap_schedule
        params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
        for i, ids in enumerate(prompts(batch, prompt_len, spec.vocab_size, seed=batch)):
            engine.add_request(f"b{batch}-{i}-{overlap_schedule}", ids, params)
        step_times, decode = [], False
        while engine.has_work:
            t0 = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - t0
            if decode and engine.scheduler.running and len(engine.scheduler.running) == batch:
                step_times.append(elapsed)
            decode = not engine.scheduler.waiting and all(s.num_generated >= 1 for s in engine.scheduler.running)
        hit = experts_hit_per_step(engine, batch, prompt_len, spec)
        step = statistics.median(step_times[2:] or step_times)
        mean_context = prompt_len + new_tokens / 2
        need = dense_bytes(spec, batch) + expert_bytes(spec, hit) + kv_bytes(spec, int(batch * mean_context))
        rows.append({"mode": "colocated", "overlap_schedule": engine.overlap, "batch": batch, "step_ms": step * 1e3,
                     "tok_per_s": batch / step, "roofline_frac": need / bandwidth / step,
                     "roofline_ms": need / bandwidth * 1e3, "bytes_per_step": need, "experts_hit": hit,
                     "decode_steps_timed": len(step_times)})
        log(f"colocated B={batch}{'' if engine.overlap else ' (no overlap schedule)'}: {step * 1e3:.2f} ms/step, "
            f"{batch / step:.0f} tok/s, {need / bandwidth / step:.2f} of roofline ({hit} experts hit)")
    engine.overlap = overlap
    ttft = []
    for i in range(3):
        engine.add_request(f"ttft-{i}", prompts(1, ttft_prompt, spec.vocab_size, seed=1000 + i)[0],
                           SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))
        t0 = time.perf_counter()
        while engine.has_work:
            engine.step()
        ttft.append(time.perf_counter() - t0)
    ttft_row = {"mode": "colocated", "prompt": ttft_prompt, "ttft_ms": statistics.median(ttft) * 1e3,
                "setup_s": setup_s}
    log(f"colocated TTFT({ttft_prompt}) {ttft_row['ttft_ms']:.1f} ms")
    del engine
    torch.cuda.empty_cache()
    return rows, ttft_row


# -- split: attention and expert processes on one GPU --------------------------------------------
def run_cuda_ipc(model_dir: Path, batches: list[int], prompt_len: int, new_tokens: int, log,
                 overlap_ab: bool = False) -> list[dict]:
    """The ``cuda_ipc`` rows: the split deployment and the colocated one through their gateways; ``overlap_ab``:
    the split one again with ``--disable-overlap-schedule`` (rows with overlap_schedule false)."""
    import serve_deployed                                  # bench/ is on sys.path

    from epserve.model_config import load_model_spec

    args = argparse.Namespace(batches=batches, prompt_len=prompt_len, new_tokens=new_tokens, skip=8, model_path=None,
                              device="cuda", dtype="bfloat16", up_args=[], start_timeout_s=240.0, timeout_s=180.0,
                              log_dir=Path(tempfile.mkdtemp(prefix="serve_gpu_deployed_")),
                              vocab=load_model_spec(model_dir).vocab_size)
    serve_deployed.with_tokenizer(model_dir)
    deployed: list[dict] = []
    for mode in ("local", "cuda_ipc"):
        serve_deployed.run_mode(mode, model_dir, args, log, deployed)
    for r in deployed:
        r["overlap_schedule"] = True
    if overlap_ab:
        before = len(deployed)
        serve_deployed.run_mode("cuda_ipc", model_dir, argparse.Namespace(**{
            **vars(args), "up_args": ["--disable-overlap-schedule"], "log_dir": args.log_dir / "no_overlap"}),
            log, deployed)
        for r in deployed[before:]:
            r["overlap_schedule"] = False
    local = {r["batch"]: r for r in deployed if r["mode"] == "local"}
    rows = []
    for r in deployed:
        if r["mode"] == "cuda_ipc":
            rows.append({"mode": "cuda_ipc", "overlap_schedule": r["overlap_schedule"], "batch": r["batch"],
                         "step_ms": r["step_ms"], "tok_per_s": r["tok_per_s"],
                         "vs_colocated_deployed": r["tok_per_s"] / local[r["batch"]]["tok_per_s"],
                         "colocated_deployed_step_ms": local[r["batch"]]["step_ms"], "measured": "through the gateway",
                         "logs": str(args.log_dir)})
            log(f"cuda_ipc B={r['batch']}{'' if r['overlap_schedule'] else ' (no overlap schedule)'}: "
                f"{r['step_ms']:.2f} ms/step, {rows[-1]['vs_colocated_deployed']:.2f} x the colocated deployment's "
                f"tokens/s ({local[r['batch']]['step_ms']:.2f} ms/step)")
    return rows


def experts_hit_per_step(engine, batch: int, prompt_len: int, spec) -> int:
    """Distinct experts one decode step of ``batch`` sequences routes to, summed over layers:
    one eager step of fresh sequences with the executor's dispatch observed."""
    from epserve.attention_worker.sampler import SamplingParams

    runner = engine.runner
    executor = runner.executor
    hits: list[int] = []
    dispatch = executor.dispatch

    def observed(call, expert_map, micro_batch, *args, **kwargs):
        assert call.topk_ids.shape[0] == batch, "the observed step must be a decode step"
        hits.append(int(torch.unique(call.topk_ids).numel()))
        return dispatch(call, expert_map, micro_batch, *args, **kwargs)

    names = [f"hit-{batch}-{i}" for i in range(batch)]
    for name, ids in zip(names, prompts(batch, prompt_len, spec.vocab_size, seed=batch)):
        engine.add_request(name, ids, SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True))
    engine.step()                       # admits them (requests wait in the inbox until a step)
    while engine.scheduler.waiting or any(s.num_generated == 0 for s in engine.scheduler.running):
        engine.step()
    assert len(engine.scheduler.running) == batch
    graphs, runner.graphs = runner.graphs, None
    executor.dispatch = observed
    try:
        engine.step()
    finally:
        executor.dispatch = dispatch
        runner.graphs = graphs
    for name in names:
        engine.abort(name)
    while engine.has_work:
        engine.step()
    return sum(hits)


# -- transformers ---------------------------------------------------------------------------------
def run_transformers(model_dir: Path, batches: list[int], prompt_len: int, new_tokens: int, ttft_prompt: int,
                     bandwidth: float, log) -> tuple[list[dict], dict]:
    import transformers

    from epserve.dummy_weights import open_weights
    from epserve.model_config import load_model_spec

    spec = load_model_spec(model_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    start = time.perf_counter()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cuda")
    copied = copy_dummy_weights(model, spec, open_weights(str(model_dir), "dummy", spec))
    model.eval()
    log(f"transformers {transformers.__version__}: model ready in {time.perf_counter() - start:.1f} s "
        f"({copied} tensors copied from the dummy weights)")
    rows = []
    for batch in batches:
        ids = torch.tensor(prompts(batch, prompt_len, spec.vocab_size, seed=batch), device="cuda")

        def timed(n: int) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,  # noqa: F821 - del'd later
                               min_new_tokens=n, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        try:
            timed(2)                                               # warm-up
            first = statistics.median(timed(1) for _ in range(2))
            full = timed(1 + new_tokens)
        except torch.OutOfMemoryError as exc:
            log(f"transformers B={batch}: out of memory ({str(exc).splitlines()[0]})")
            rows.append({"mode": "transformers", "batch": batch, "step_ms": float("nan"), "tok_per_s": 0.0,
                         "roofline_frac": 0.0, "roofline_ms": float("nan"), "out_of_memory": True})
            torch.cuda.empty_cache()
            continue
        step = (full - first) / new_tokens
        # expert hits as if routing were uniform; main() replaces this with the colocated run's count
        hit = spec.num_moe_layers * spec.num_experts * (1 - (1 - spec.num_experts_per_tok / spec.num_experts) ** batch)
        need = (dense_bytes(spec, batch) + expert_bytes(spec, int(hit))
                + kv_bytes(spec, int(batch * (prompt_len + new_tokens / 2))))
        rows.append({"mode": "transformers", "batch": batch, "step_ms": step * 1e3, "tok_per_s": batch / step,
                     "roofline_frac": need / bandwidth / step, "roofline_ms": need / bandwidth * 1e3,
                     "new_tokens_timed": new_tokens})
        log(f"transformers B={batch}: {step * 1e3:.2f} ms/step, {batch / step:.0f} tok/s")
    ids = torch.tensor(prompts(1, ttft_prompt, spec.vocab_size, seed=1000), device="cuda")
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ttft_row = {"mode": "transformers", "prompt": ttft_prompt, "ttft_ms": statistics.median(times) * 1e3}
    log(f"transformers TTFT({ttft_prompt}) {ttft_row['ttft_ms']:.1f} ms")
    del model
    torch.cuda.empty_cache()
    return rows, ttft_row


def copy_dummy_weights(model, spec, reader) -> int:
    """Fill a transformers Qwen3-MoE with the tensors epserve's dummy loader draws (experts fused as
    transformers 5 holds them: gate_up_proj [E, 2I, D], down_proj [E, D, I])."""
    copied = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp.experts." in name:
                layer = int(name.split(".")[2])
                experts = reader.read_experts(layer, range(spec.num_experts), param.dtype, param.device)
                which = 0 if name.endswith("gate_up_proj") else 1
                for e, tensors in experts.items():
                    param[e].copy_(tensors[which])
            else:
                param.copy_(reader.read([name], param.dtype, param.device)[name])
            copied += 1
    return copied


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 48 for qwen3-30b-a3b, "
                                                                    "4 for deepseek-v3)")
    parser.add_argument("--dense-layers", type=int, default=None,
                        help="deepseek-v3: how many of the first layers are dense (first_k_dense_replace; default 1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hf-new-tokens", type=int, default=8, help="decode steps timed for transformers")
    parser.add_argument("--ttft-prompt", type=int, default=4096)
    parser.add_argument("--modes", nargs="+", default=None,
                        help="colocated, transformers and/or cuda_ipc (default: colocated and transformers for "
                             "qwen3-30b-a3b, colocated for deepseek-v3)")
    parser.add_argument("--deployed-new-tokens", type=int, default=64, help="cuda_ipc: new tokens per stream")
    parser.add_argument("--overlap-ab", action="store_true",
                        help="colocated and cuda_ipc: time each batch also without the overlap schedule "
                             "(rows with overlap_schedule false; cuda_ipc: a second split deployment)")
    parser.add_argument("--name", default=None, help="result file stem (default: serve_gpu_h200 for qwen3-30b-a3b, "
                                                     "serve_gpu_deepseek_v3_h200 for deepseek-v3)")
    args = parser.parse_args()
    _, default_layers, model_name, default_name = MODELS[args.model]
    deepseek = args.model == "deepseek-v3"
    args.layers = args.layers or default_layers
    args.name = args.name or default_name
    args.modes = args.modes or (["colocated"] if deepseek else ["colocated", "transformers"])
    if deepseek and set(args.modes) - {"colocated"}:
        parser.error("--model deepseek-v3 runs --modes colocated only (the transformers row copies Qwen3's weights)")
    if set(args.modes) - {"colocated", "transformers", "cuda_ipc"}:
        parser.error(f"--modes: colocated, transformers, cuda_ipc; got {' '.join(args.modes)}")
    if args.dense_layers is not None and not deepseek:
        parser.error("--dense-layers applies to --model deepseek-v3 only")
    dense_layers = (1 if args.dense_layers is None else args.dense_layers) if deepseek else None
    if deepseek and not 0 <= dense_layers < args.layers:
        parser.error(f"--dense-layers must be in [0, --layers) so that a MoE layer remains, got {dense_layers}")

    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    log(f"{device}; torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    model_dir = write_model_dir(args.model, args.layers, dense_layers)
    rows, ttfts = [], []
    for mode in args.modes:
        if mode == "cuda_ipc":
            continue                                    # after the in-process modes, in processes of its own
        run = {"colocated": run_colocated, "transformers": run_transformers}[mode]
        new_tokens = args.hf_new_tokens if mode == "transformers" else args.new_tokens
        extra = {"overlap_ab": args.overlap_ab} if mode == "colocated" else {}
        mode_rows, ttft = run(model_dir, args.batches, args.prompt_len, new_tokens, args.ttft_prompt, bandwidth, log,
                              **extra)
        rows += mode_rows
        ttfts.append(ttft)
    if "cuda_ipc" in args.modes:
        torch.cuda.empty_cache()
        rows += run_cuda_ipc(model_dir, args.batches, args.prompt_len, args.deployed_new_tokens, log,
                             overlap_ab=args.overlap_ab)
    measured = {r["batch"]: r for r in rows if r["mode"] == "colocated" and r["overlap_schedule"]}
    for row in rows:        # the same weights and prompts route the same: use the measured expert hits
        if row["mode"] in ("transformers", "cuda_ipc") and row["batch"] in measured:
            row["roofline_ms"] = measured[row["batch"]]["roofline_ms"]
            row["roofline_frac"] = row["roofline_ms"] / row["step_ms"]
    record = {"machine": f"{device} ({platform.node()})", "date": datetime.date.today().isoformat(),
              "command": " ".join(sys.argv), "torch": torch.__version__, "copy_bandwidth_Bps": bandwidth,
              "model": f"{model_name} shape, {args.layers} layers"
                       + (f" ({dense_layers} dense)" if deepseek else "") + ", bf16, dummy weights", "rows": rows,
              "ttft": ttfts, "log": lines}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    table = ["| mode | batch | ms/step | tok/s | roofline ms | fraction of roofline |", "|---|---|---|---|---|---|"]
    for row in rows:
        mode = row["mode"] + ("" if row.get("overlap_schedule", True) else ", no overlap schedule")
        if "vs_colocated_deployed" in row:
            mode += f" ({row['vs_colocated_deployed']:.2f} × colocated, both through the gateway)"
        table.append(f"| {mode} | {row['batch']} | {row['step_ms']:.2f} | {row['tok_per_s']:.0f} | "
                     f"{row.get('roofline_ms', float('nan')):.2f} | {row.get('roofline_frac', float('nan')):.2f} |")
    table += ["", "| mode | prompt | TTFT ms |", "|---|---|---|"]
    table += [f"| {t['mode']} | {t['prompt']} | {t['ttft_ms']:.1f} |" for t in ttfts]
    print("\n".join(table))
    (args.out_dir / f"{args.name}.table.md").write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
