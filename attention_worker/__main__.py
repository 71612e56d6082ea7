"""``python -m epserve.attention_worker``: one attention/data-parallel worker.

``main()`` is the process skeleton (``epserve.process.run_process``): flags (``build_parser``) →
``AttentionWorkerConfig`` (``config_from_args``; the environment is read there, once) → serve
(``epserve.process.serve_worker``: join the deployment, serve until SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Mapping

from epserve.attention_worker.config import (HEATMAP_ENV, MOE_A2A_BACKENDS, AttentionWorkerConfig,
                                             default_expert_distribution_dir, heatmap_interval_from_env)
from epserve.attention_worker.engine import EngineLimits
from epserve.attention_worker.expert_routing import DispatchAlgorithm
from epserve.attention_worker.step_experts import GPU_TWO_MICRO_BATCHES_ENV
from epserve.grpc_security import add_security_arguments, security_from_args
from epserve.process import run_process
from epserve.process_flags import add_telemetry_arguments, add_worker_arguments, config_defaults, config_kwargs

PORT_LINE = "ATTENTION_WORKER_PORT"


def build_parser() -> argparse.ArgumentParser:
    defaults = config_defaults(AttentionWorkerConfig)
    p = argparse.ArgumentParser(
        prog="python -m epserve.attention_worker",
        description="Attention/data-parallel worker: embeddings, attention with a paged KV cache, router, "
                    "sampling and continuous batching; routed experts run on expert workers reached through "
                    "the data plane, or in this process with --moe-a2a-backend local. Registers with the "
                    "placement service and serves epserve.v1.AttentionWorker.",
        epilog=f"environment: {HEATMAP_ENV[0]}=N (or SGLang's {HEATMAP_ENV[1]} when it is unset): every N forward "
               "passes, log a summary of the [MoE layer, expert worker] token counts of those passes and append "
               "the matrix to --expert-distribution-dir as one JSON line; 0 or unset = off. "
               f"{GPU_TWO_MICRO_BATCHES_ENV}=1: allow --num-micro-batches 2 on the GPU cuda_ipc step path (refused "
               "otherwise: not yet proven there). "
               "EPSERVE_WORKER_ID: default --worker-id. OTEL_EXPORTER_OTLP_ENDPOINT: default --otlp-endpoint.")
    add_worker_arguments(p, defaults, dtype_help="model dtype", port_line=PORT_LINE)
    p.add_argument("--moe-a2a-backend", default=defaults["moe_a2a_backend"], choices=MOE_A2A_BACKENDS,
                   help="local: hold every routed expert in this process and start serving right after "
                        "registering (a colocated deployment: placement runs with --moe-a2a-backend local --ep-size "
                        "0, no expert workers); any other value: experts live on expert workers, reached over the "
                        "data-plane backend placement names (default %(default)s)")
    p.add_argument("--moe-runner-backend", default=defaults["moe_runner_backend"],
                   help="expert kernels with --moe-a2a-backend local: auto|torch|triton|deep_gemm|flashinfer_cutlass "
                        "(default %(default)s: triton on CUDA, torch elsewhere); unused otherwise")
    p.add_argument("--num-kv-blocks", type=int, default=EngineLimits.num_kv_blocks, help="KV cache blocks")
    p.add_argument("--kv-block-size", type=int, default=EngineLimits.kv_block_size, help="tokens per KV block")
    p.add_argument("--max-num-batched-tokens", type=int, default=EngineLimits.max_num_batched_tokens,
                   help="token budget of one step (prefill chunks beyond it are split)")
    p.add_argument("--max-running-requests", type=int, default=EngineLimits.max_num_seqs,
                   help="sequences in flight at most")
    p.add_argument("--num-micro-batches", type=int, default=EngineLimits.num_micro_batches, choices=[1, 2],
                   help="2 overlaps one micro-batch's expert exchange with the other's attention (SGLang's two-batch "
                        "overlap). Default: 2 on the CPU runner; 1 on the GPU step path (cuda_ipc), where on one GPU "
                        "two halves of a decode step read most experts' weights twice")
    p.add_argument("--context-length", type=int, default=defaults["max_context"], help="context limit; 0 = the model's")
    add_gpu_engine_arguments(p)
    p.add_argument("--ep-dispatch-algorithm", default=defaults["ep_dispatch_algorithm"],
                   choices=[a.value for a in DispatchAlgorithm],
                   help="how a logical expert's replica is chosen (default %(default)s; dynamic: random per "
                        "choice, which spreads load evenly over replicas as EPLB plans assume; static: replica "
                        "rank mod R); "
                        "--moe-a2a-backend local has one replica per expert and ignores it")
    p.add_argument("--expert-distribution-recorder-mode", default=defaults["expert_distribution_recorder_mode"],
                   choices=["stat", "per_pass", "per_token"],
                   help="expert-load recording: stat = per-window [layer, slot] counts reported to placement; "
                        "per_pass / per_token also keep per-pass [layer, slot] counts / per-token slot choices in "
                        "memory until dumped (`epserve admin ... dump-expert-distribution DIR`; memory grows with "
                        "traffic between dumps)")
    p.add_argument("--enable-expert-distribution-metrics", action="store_true",
                   help="serve tokens sent to each expert worker (epserve_attention_expert_tokens_total, one series "
                        "per expert worker) and their balancedness on /metrics; needs --metrics-port. Off by "
                        "default: it counts every pass per expert worker on the engine thread")
    p.add_argument("--expert-distribution-dir", default=default_expert_distribution_dir(),
                   help="where the heatmap (env " + HEATMAP_ENV[0] + "=N: every N forward passes, a [MoE layer, "
                        "expert worker] token count matrix) is appended as JSON lines, one file per worker "
                        "(default %(default)s)")
    p.add_argument("--load-report-interval-s", type=float, default=defaults["load_report_interval_s"],
                   help="how often the expert-load window is reported to placement (default %(default)s; "
                        "--moe-a2a-backend local reports none: a colocated deployment has no placement to "
                        "rebalance)")
    p.add_argument("--dataplane-timeout-s", type=float, default=defaults["dataplane_timeout_s"],
                   help="deadline of one expert exchange over the data plane (default %(default)s)")
    p.add_argument("--elastic-ep-recovery-timeout-s", type=float, default=defaults["elastic_ep_recovery_timeout_s"],
                   help="with placement's --elastic-ep-backend: how long a MoE layer interrupted by an expert worker's "
                        "loss waits for a map that serves it (routed around, or its experts reloaded) before the "
                        "worker gives up (default %(default)s)")
    add_telemetry_arguments(p, defaults, "epserve-attention-worker", PORT_LINE)
    p.add_argument("--trace-step-every", type=int, default=defaults["trace_step_every"],
                   help="record per-step spans (attention.step, moe.dispatch/combine, and expert.compute on the "
                        "expert workers) on every Nth engine step; 1 = every step, 0 = never (default %(default)s)")
    p.add_argument("--max-queued-requests", type=int, default=defaults["max_queued_requests"],
                   help="requests that may wait beyond --max-running-requests; more are refused with "
                        "RESOURCE_EXHAUSTED (the gateway then tries another worker) (default %(default)s)")
    p.add_argument("--stream-interval", type=int, default=defaults["stream_interval"],
                   help="tokens a request's stream message carries at least (SGLang's flag; the last message may "
                        "hold fewer): fewer gRPC messages per token on this worker and the gateway, at the cost of "
                        "streaming granularity. Tokens already waiting are sent together whatever the interval "
                        "(default %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=defaults["max_message_bytes"],
                   help="largest gRPC message a caller may send (default %(default)s)")
    add_security_arguments(p, token_help="the deployment's token: callers (the gateway, placement) must send it, "
                                         "and this worker sends it to placement")
    return p


def add_gpu_engine_arguments(p: argparse.ArgumentParser) -> None:
    """SGLang's names for the GPU step path (``EngineLimits``); the same flags on ``epserve generate``
    and ``epserve up``."""
    p.add_argument("--attention-backend", default=EngineLimits.attention_backend,
                   choices=["auto", "triton", "torch_native"],
                   help="attention and step path: triton = batched GPU runner (Triton paged attention, CUDA "
                        "graphs for decode, GPU sampling); torch_native = host runner (per-sequence SDPA); auto "
                        "(default) = triton on CUDA devices, torch_native elsewhere")
    p.add_argument("--cuda-graph-max-bs", type=int, default=EngineLimits.cuda_graph_max_bs,
                   help="with the triton backend, decode steps of up to this many sequences replay a captured "
                        f"CUDA graph; larger ones run eagerly (default {EngineLimits.cuda_graph_max_bs})")
    p.add_argument("--disable-cuda-graph", action="store_true",
                   help="with the triton backend, run every step eagerly (no graph capture at start-up)")
    p.add_argument("--disable-overlap-schedule", action="store_true",
                   help="with the triton backend and experts in this process, never launch a decode step before "
                        "the step before it has finished (by default the next step is queued while the host reads "
                        "the last one's tokens)")


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> AttentionWorkerConfig:
    """The config from parsed flags and the environment (read here only). ValueError naming the flag,
    or the heatmap directory when it cannot be written (found at start, not at the first interval)."""
    config = AttentionWorkerConfig(**config_kwargs(
        AttentionWorkerConfig, args,
        limits=EngineLimits(num_kv_blocks=args.num_kv_blocks, kv_block_size=args.kv_block_size,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            max_num_seqs=args.max_running_requests, num_micro_batches=args.num_micro_batches,
                            cuda_graph_max_bs=args.cuda_graph_max_bs, disable_cuda_graph=args.disable_cuda_graph,
                            disable_overlap_schedule=args.disable_overlap_schedule,
                            attention_backend=args.attention_backend),
        max_context=args.context_length, eplb_heatmap_collection_interval=heatmap_interval_from_env(environ),
        gpu_two_micro_batches=environ.get(GPU_TWO_MICRO_BATCHES_ENV) == "1",
        security=security_from_args(args)))
    if config.eplb_heatmap_collection_interval:
        from epserve.attention_worker.expert_heatmap import HeatmapWriter

        HeatmapWriter(config.expert_distribution_dir, config.worker_id).check_writable()
    return config


def serve(config: AttentionWorkerConfig, stop: threading.Event) -> int:
    from epserve.process import serve_worker
    from epserve.telemetry import AttentionWorkerMetrics
    from epserve.attention_worker.worker import TRACING_SERVICE_NAME, AttentionWorker

    def make_metrics() -> AttentionWorkerMetrics:
        return AttentionWorkerMetrics(expert_distribution=config.enable_expert_distribution_metrics)

    return serve_worker(config, stop, name="attention_worker", service_name=TRACING_SERVICE_NAME,
                        make_metrics=make_metrics, build_worker=AttentionWorker, port_line=PORT_LINE)


def main(argv: list[str] | None = None) -> int:
    return run_process("attention_worker", build_parser(), lambda args: config_from_args(args, os.environ),
                       lambda config: config.worker_id, serve, argv)


if __name__ == "__main__":
    from epserve.process import exit_now

    exit_now(main())
