"""``epserve up``: start a whole deployment as local processes, keep it alive, stop it on Ctrl-C / SIGTERM.

Before any process starts: the flags and files are checked (``startup_checks.py``). Security is on by
default: the deployment's token is read from ``--auth-token-file`` (default ``<cache>/auth_token``,
made with mode 0600 when missing; ``epserve admin`` reads the same file), and every listener binds
``--host`` (127.0.0.1). Placement keeps its state in ``--state-db`` (default: a file under
``<cache>/state`` for this run, removed at a clean exit), so a restarted placement resumes at the same
map version. Children that die are restarted (``--max-restarts``, ``deployment.LocalDeployment.wait``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "up", help="start placement, expert workers, attention workers and a gateway as local processes",
        description="Start a whole epserve deployment as local processes: the placement service, "
                    "--expert-workers expert workers, --attention-workers attention workers and the gateway "
                    "(with --moe-a2a-backend local: no expert workers, every attention worker holds all "
                    "experts). Waits until all are healthy, prints the endpoints, and stops every process it "
                    "started on Ctrl-C or SIGTERM. Without --model-path an embedded tiny model is made once into "
                    "the cache directory ($EPSERVE_CACHE_DIR or ~/.cache/epserve).")
    p.add_argument("--model-path", default=None, help="Hugging Face model directory (default: embedded tiny model)")
    p.add_argument("--attention-workers", "--dp-size", dest="attention_workers", type=int, default=2,
                   help="attention/data-parallel workers (default 2)")
    p.add_argument("--expert-workers", "--ep-size", dest="expert_workers", type=int, default=None,
                   help="expert-parallel workers (default 2; with --moe-a2a-backend local none: 0 is the only "
                        "value it takes)")
    p.add_argument("--tp-size", type=int, default=None,
                   help="tensor-parallel size of the MoE layers (SGLang's meaning; default: --expert-workers, i.e. "
                        "each expert is whole on one worker). Must be a multiple of --ep-size, and "
                        "tp_size / ep_size must divide the model's moe_intermediate_size")
    p.add_argument("--ep-num-redundant-experts", type=int, default=0,
                   help="redundant expert slots per MoE layer; experts + R must divide by --expert-workers")
    p.add_argument("--dtype", default="bfloat16", choices=["float64", "float32", "bfloat16", "float16"],
                   help="model dtype (default bfloat16; float64 for exact parity checks)")
    p.add_argument("--device", default="cpu",
                   help="torch device of every worker unless --attention-device / --expert-devices say otherwise "
                        "(default cpu)")
    hybrid = p.add_argument_group("hybrid devices (docs/architecture.md, \"Hybrid devices\")")
    hybrid.add_argument("--attention-device", default="", metavar="DEVICE",
                        help="device of the attention workers, e.g. cuda:0 (default: --device)")
    hybrid.add_argument("--expert-devices", type=_list_of(str), default=None, metavar="D0,D1,...",
                        help="one device per expert worker, e.g. cuda:0,cuda:0,cpu (default: --device for each); "
                             "with CPU and GPU workers mixed the torch data plane runs on gloo through host memory")
    hybrid.add_argument("--expert-capacities", type=_list_of(float), default=None, metavar="C0,C1,...",
                        help="one relative speed per expert worker, e.g. 1,1,0.1: placement gives slower workers "
                             "fewer and colder experts (default: each expert worker measures its own at start-up, "
                             "--capacity auto: its expert GEMM rate in TFLOP/s)")
    hybrid.add_argument("--expert-num-threads", type=_list_of(int), default=None, metavar="N0,N1,...",
                        help="torch CPU threads of each expert worker (default 1 each)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="where every worker's weights come from: auto (default) and safetensors read the "
                        "checkpoint; dummy draws random weights on --device from a fixed seed, the same values "
                        "in every worker, and reads only config.json from --model-path (benchmarks at real "
                        "model sizes without a checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address every process binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50050, help="gateway port (default 50050; 0 picks one)")
    p.add_argument("--placement-port", type=int, default=0, help="placement service port (default: pick one)")
    p.add_argument("--moe-a2a-backend", default="torch", choices=["torch", "local", "cuda_ipc", "mooncake", "deepep"],
                   help="data plane between attention and expert workers (default torch: gloo on CPU); cuda_ipc = "
                        "shared memory, every process on this host (CUDA IPC buffers with --device cuda, host "
                        "shared memory with --device cpu); local = "
                        "colocated: no expert workers, every attention worker loads all experts and runs them "
                        "in-process (one GPU per attention worker with --device cuda)")
    p.add_argument("--mps", default="auto", choices=["auto", "on", "off"],
                   help="CUDA MPS for processes sharing a GPU: auto (default) starts a user-space daemon for the "
                        "deployment when --moe-a2a-backend cuda_ipc puts several processes on one GPU and none "
                        "runs (without it their kernels time-slice: ~4 ms per MoE layer hand-off instead of "
                        "~10 µs); on: whenever none runs; off: never. No root, no device setting changed")
    p.add_argument("--moe-runner-backend", default="auto",
                   help="expert kernels of the expert workers, or with --moe-a2a-backend local of the attention "
                        "workers (default auto)")
    p.add_argument("--expert-load-duty-cycle", type=float, default=None, metavar="FRACTION",
                   help="expert workers load a live map change's experts for at most this fraction of the "
                        "wall time (default: the expert worker's, 0.25; 1 = full speed)")
    p.add_argument("--ep-dispatch-algorithm", default="dynamic", choices=["static", "dynamic", "fake"],
                   help="replica choice per token (default dynamic: spreads load over replicas as the "
                        "EPLB planners assume; static pins attention rank r to replica r mod R)")
    p.add_argument("--init-expert-location", default="trivial", help="'trivial' or a snapshot file (.json/.pt)")
    p.add_argument("--state-db", default="auto", metavar="FILE",
                   help="SQLite file for the placement service's state, so a restarted placement resumes at the "
                        "same map version and ranks (default auto: <cache>/state/placement-<pid>.db, removed at a "
                        "clean exit; none: in memory only)")
    security = p.add_argument_group("security and supervision (docs/operations.md)")
    security.add_argument("--auth-token-file", default="", metavar="FILE",
                          help="the deployment's token (every RPC between the processes and from `epserve admin` "
                               "carries it; mode 0600); made when missing (default: <cache>/auth_token, which "
                               "`epserve admin` reads by default)")
    security.add_argument("--no-auth-token", action="store_true",
                          help="run without a token: any local user who reaches a port may use the admin and "
                               "worker APIs (listeners still bind --host)")
    security.add_argument("--api-token-file", default="", metavar="FILE",
                          help="clients of the public Generation API must send the token in FILE (default: open)")
    security.add_argument("--tls-cert", default="", metavar="PEM", help="TLS certificate of every process")
    security.add_argument("--tls-key", default="", metavar="PEM", help="its private key")
    security.add_argument("--tls-ca", default="", metavar="PEM",
                          help="CA that signed the certificates: every server then requires client certificates "
                               "(mTLS)")
    security.add_argument("--max-restarts", type=int, default=5,
                          help="a child that dies is started again, at most this many times within "
                               "--restart-window-s (then a worker is left down, placement or the gateway end the "
                               "deployment); 0 = the first death stops everything (default 5)")
    security.add_argument("--restart-window-s", type=float, default=600.0,
                          help="the window of --max-restarts in seconds (default 600)")
    eplb = p.add_argument_group("expert-parallel load balancing (passed to the placement service)")
    eplb.add_argument("--enable-eplb", action="store_true", help="rebalance automatically from reported load")
    eplb.add_argument("--eplb-algorithm", default="auto",
                      choices=["auto", "deepseek", "deepseek_hierarchical", "elasticity_aware", "movement_aware"],
                      help="planning algorithm (default auto)")
    eplb.add_argument("--eplb-rebalance-num-iterations", type=int, default=None,
                      help="rebalance every N forward passes (placement's default when omitted)")
    eplb.add_argument("--eplb-rebalance-layers-per-chunk", type=int, default=None,
                      help="MoE layers changed per map version; 0 = all at once")
    eplb.add_argument("--load-report-interval-s", type=float, default=None,
                      help="how often attention workers report expert load (default 2)")
    eplb.add_argument("--elastic-ep-backend", default="none", choices=["none", "placement", "mooncake"],
                      help="placement: keep serving when expert workers die, come back, are added or drained "
                           "(docs/operations.md, \"When a worker dies\"); implies --eplb-algorithm elasticity_aware "
                           "for auto (default none)")
    engine = p.add_argument_group("attention workers' engine (SGLang's names; default: the attention worker's)")
    engine.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch_native"],
                        help="triton = batched GPU runner (Triton paged attention, CUDA graphs for decode, GPU "
                             "sampling); torch_native = host runner; auto (default) = triton on CUDA devices, "
                             "torch_native elsewhere")
    engine.add_argument("--cuda-graph-max-bs", type=int, default=None,
                        help="with the triton backend, decode steps of up to this many sequences replay a CUDA "
                             "graph (default 256)")
    engine.add_argument("--disable-cuda-graph", action="store_true",
                        help="with the triton backend, run every step eagerly (no graph capture)")
    engine.add_argument("--disable-overlap-schedule", action="store_true",
                        help="with the triton backend and experts in this process, never launch a decode step before "
                             "the step before it has finished (by default the next step is queued while the host reads "
                             "the last one's tokens)")
    engine.add_argument("--max-running-requests", type=int, default=None,
                        help="sequences in flight per attention worker (default 64)")
    engine.add_argument("--num-kv-blocks", type=int, default=None,
                        help="KV cache blocks per attention worker (default 512)")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget of one engine step (default 2048)")
    engine.add_argument("--context-length", type=int, default=None, help="context limit; 0 = the model's (default)")
    engine.add_argument("--num-micro-batches", type=int, default=None, choices=[1, 2],
                        help="2 = two micro-batches in flight: one's attention overlaps the other's expert exchange "
                             "(SGLang's two-batch overlap). Default: 2 on the CPU runner, 1 on the GPU step path "
                             "(on one GPU two halves read most experts' weights twice)")
    engine.add_argument("--stream-interval", type=int, default=None,
                        help="tokens per streamed message at least, on the attention workers (default 1): fewer "
                             "gRPC messages per token between worker, gateway and client, coarser streaming")
    p.add_argument("--otlp-endpoint", default="",
                   help="OTLP gRPC collector HOST:PORT every process sends traces to (default: "
                        "$OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing)")
    p.add_argument("--metrics", action="store_true",
                   help="serve Prometheus /metrics on every process (free ports, printed once up)")
    dist = p.add_argument_group("expert distribution (passed to the attention workers)")
    dist.add_argument("--expert-distribution-recorder-mode", default="stat", choices=["stat", "per_pass", "per_token"],
                      help="stat (default) = load windows for placement only; per_pass / per_token also keep "
                           "per-pass counts / per-token choices for `epserve admin dump-expert-distribution`")
    dist.add_argument("--enable-expert-distribution-metrics", action="store_true",
                      help="tokens per expert worker and their balancedness on the attention workers' /metrics "
                           "(needs --metrics)")
    dist.add_argument("--expert-distribution-dir", default="",
                      help="directory of the heatmap files (EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL=N in the "
                           "environment: a [MoE layer, expert worker] matrix every N passes); default: the "
                           "workers' (<tmp>/epserve_expert_distribution)")
    p.add_argument("--log-dir", default="", help="write each process's log to DIR/<name>.log instead of stderr")
    p.add_argument("--sglang-default-seed", type=int, default=None, metavar="SEED",
                   help="the gateway's sampling seed for requests through SGLang's protocol (SMG) that bring none; "
                        "sample i of n uses SEED + i (default: random)")
    return p


def run(args: argparse.Namespace) -> int:
    from epserve.deployment import LocalDeployment
    from epserve.deployment_config import DeploymentConfig
    from epserve.mps import MpsUnavailable, UserMps, plan_mps
    from epserve.process import shutdown_event

    from epserve.grpc_security import default_cache_dir
    from epserve.startup_checks import check_deployment

    cache_dir = default_cache_dir()
    model_path = args.model_path
    if model_path is None:
        from epserve.tiny_model import default_model_dir

        model_path = str(default_model_dir(cache_dir))
        print(f"epserve up: using the embedded tiny model at {model_path}", file=sys.stderr)
    from epserve.model_config import ModelConfigError, check_parallel_sizes, load_model_spec

    try:
        spec = load_model_spec(model_path)
        if args.moe_a2a_backend == "local":
            _check_colocated_flags(args)
            expert_workers = args.expert_workers
        else:
            expert_workers = 2 if args.expert_workers is None else args.expert_workers
            if expert_workers >= 1:       # fewer: DeploymentConfig says what to change
                check_parallel_sizes(spec, args.tp_size or expert_workers, expert_workers)
                if (args.tp_size or expert_workers) != expert_workers:
                    raise ValueError(f"--tp-size {args.tp_size} > --ep-size {expert_workers}: slicing one expert "
                                     "over several expert workers is not built yet; use --tp-size equal to --ep-size")
        if args.stream_interval is not None and args.stream_interval < 1:
            raise ValueError(f"--stream-interval must be >= 1, got {args.stream_interval}")
        if args.expert_load_duty_cycle is not None and not 0 < args.expert_load_duty_cycle <= 1:
            raise ValueError(f"--expert-load-duty-cycle must be in (0, 1], got {args.expert_load_duty_cycle}")
        token_file = _token_file(args)
        state_db = _state_db(args.state_db, cache_dir)
        config = DeploymentConfig(
            model_path=model_path, num_attention_workers=args.attention_workers,
            num_expert_workers=expert_workers, num_redundant_experts=args.ep_num_redundant_experts,
            dtype=args.dtype, device=args.device, attention_device=args.attention_device,
            expert_devices=args.expert_devices, expert_capacities=args.expert_capacities or "auto",
            expert_num_threads=args.expert_num_threads, load_format=args.load_format, host=args.host,
            gateway_port=args.port, placement_port=args.placement_port, moe_a2a_backend=args.moe_a2a_backend,
            moe_runner_backend=args.moe_runner_backend, ep_dispatch_algorithm=args.ep_dispatch_algorithm,
            init_expert_location=args.init_expert_location, state_db=state_db, auth_token_file=token_file,
            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, max_restarts=args.max_restarts,
            restart_window_s=args.restart_window_s,
            otlp_endpoint=args.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            metrics=args.metrics, log_dir=args.log_dir, attention_backend=args.attention_backend,
            cuda_graph_max_bs=args.cuda_graph_max_bs, disable_cuda_graph=args.disable_cuda_graph,
            disable_overlap_schedule=args.disable_overlap_schedule, max_running_requests=args.max_running_requests,
            num_kv_blocks=args.num_kv_blocks,
            max_num_batched_tokens=args.max_num_batched_tokens, context_length=args.context_length,
            num_micro_batches=args.num_micro_batches,
            enable_expert_distribution_metrics=args.enable_expert_distribution_metrics,
            expert_distribution_recorder_mode=args.expert_distribution_recorder_mode,
            expert_distribution_dir=args.expert_distribution_dir,
            extra_placement_args=_eplb_args(args),
            extra_attention_args=([] if args.load_report_interval_s is None
                                  else ["--load-report-interval-s", str(args.load_report_interval_s)])
                                 + ([] if args.stream_interval is None
                                    else ["--stream-interval", str(args.stream_interval)]),
            extra_expert_args=([] if args.expert_load_duty_cycle is None
                               else ["--expert-load-duty-cycle", str(args.expert_load_duty_cycle)]),
            extra_gateway_args=([] if args.sglang_default_seed is None
                                else ["--sglang-default-seed", str(args.sglang_default_seed)]))
        if args.api_token_file:
            config.extra_gateway_args += ["--api-token-file", args.api_token_file]
        check_deployment(config)
        mps_plan = plan_mps(args.mps, args.moe_a2a_backend, config.process_devices())
    except (ValueError, ModelConfigError) as exc:
        print(f"epserve up: {exc}", file=sys.stderr)
        return 2
    if mps_plan.warning:
        print(f"epserve up: warning: {mps_plan.warning}", file=sys.stderr)
    mps = UserMps() if mps_plan.start else None
    if mps is not None:
        try:
            os.environ.update({k: v for k, v in mps.start().items() if k.startswith("CUDA_MPS_")})
        except MpsUnavailable as exc:
            print(f"epserve up: {exc} (use --mps off to run without it)", file=sys.stderr)
            return 2
        print(f"epserve up: CUDA MPS daemon for this deployment in {mps.folder} (--mps)", file=sys.stderr)
    stop = shutdown_event()
    deployment = LocalDeployment(config)
    try:
        deployment.start()
    except (RuntimeError, TimeoutError) as exc:
        print(f"epserve up: {exc}", file=sys.stderr)
        _remove_state_db(args.state_db, state_db)
        if mps is not None:
            mps.stop()
        return 1
    print(f"gateway    {args.host}:{deployment.gateway_port}   (epserve.v1.Generation; SGLang's SglangScheduler for "
          f"smg: --worker-urls grpc://{args.host}:{deployment.gateway_port})", flush=True)
    print(f"placement  {args.host}:{deployment.placement_port}   (epserve.v1.Placement, PlacementAdmin)",
          flush=True)
    if config.otlp_endpoint:
        print(f"traces     OTLP gRPC to {config.otlp_endpoint}", flush=True)
    for name, endpoint in deployment.metrics_endpoints.items():
        print(f"metrics    {name:<12} http://{endpoint}/metrics", flush=True)
    if args.metrics and "placement" not in deployment.metrics_endpoints:
        print("metrics    placement    (not served by this placement service)", flush=True)
    up_metrics = None
    if args.metrics:        # this launcher's own: child restarts
        from epserve.telemetry import start_metrics_server

        up_metrics = start_metrics_server(0, deployment.restart_metrics.registry, args.host)
        print(f"metrics    {'up':<12} http://{args.host}:{up_metrics.port}/metrics", flush=True)
        print(f"epserve up: child restarts on http://{args.host}:{up_metrics.port}/metrics", file=sys.stderr)
    if token_file:
        print(f"auth       token in {token_file} (epserve admin reads it; clients of the gateway need "
              + (f"{args.api_token_file})" if args.api_token_file else "none)"), flush=True)
    print(f"try: epserve generate --gateway {args.host}:{deployment.gateway_port} --prompt 'Hello'", flush=True)
    code = deployment.wait(stop)
    deployment.stop()
    if mps is not None:
        mps.stop()
    if up_metrics is not None:
        up_metrics.stop()
    _remove_state_db(args.state_db, state_db)
    return code


def _list_of(kind: type) -> Callable[[str], list]:
    """argparse type of a comma-separated list (``cuda:0,cpu``, ``1,0.1``)."""
    def parse(text: str) -> list:
        try:
            return [kind(item.strip()) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got "
                                             f"{text!r}") from None
    return parse


def _token_file(args: argparse.Namespace) -> str:
    """The token file children read ("" with --no-auth-token), made (0600) when missing."""
    from epserve.grpc_security import default_token_path, ensure_token_file

    if args.no_auth_token:
        if args.auth_token_file:
            raise ValueError("--no-auth-token and --auth-token-file contradict each other: drop one")
        return ""
    path = args.auth_token_file or str(default_token_path())
    ensure_token_file(path)
    return path


def _state_db(flag: str, cache_dir) -> str:
    """--state-db: auto = a file of this run under <cache>/state (files of runs that are gone are removed)."""
    if flag == "none":
        return ""
    if flag != "auto":
        return flag
    directory = cache_dir / "state"
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("placement-*.db*"):       # left by an `epserve up` that was killed
        pid = old.name.removeprefix("placement-").split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            old.unlink(missing_ok=True)
    return str(directory / f"placement-{os.getpid()}.db")


def _remove_state_db(flag: str, path: str) -> None:
    if flag == "auto" and path:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(path + suffix)
            except FileNotFoundError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_colocated_flags(args: argparse.Namespace) -> None:
    """The flags only expert workers or expert placement use make no sense with --moe-a2a-backend
    local (DeploymentConfig checks the expert-worker count, redundancy and the initial placement)."""
    reason = "with --moe-a2a-backend local every attention worker holds all experts itself (no expert workers)"
    if args.tp_size not in (None, 1):
        raise ValueError(f"--tp-size {args.tp_size}: {reason}, each whole; leave --tp-size out")
    if args.expert_load_duty_cycle is not None:
        raise ValueError(f"--expert-load-duty-cycle: {reason}, loaded once at start-up; drop the flag")
    if args.enable_eplb:
        raise ValueError(f"--enable-eplb: {reason}, so there is no expert placement to rebalance; drop the flag")


def _eplb_args(args: argparse.Namespace) -> list[str]:
    """The EPLB flags, as the placement service spells them; bytes per weight from --dtype."""
    extra = ["--eplb-algorithm", args.eplb_algorithm,
             "--eplb-expert-dtype-bytes", str({"float64": 8, "float32": 4}.get(args.dtype, 2))]
    if args.enable_eplb:
        extra.append("--enable-eplb")
    if args.eplb_rebalance_num_iterations is not None:
        extra += ["--eplb-rebalance-num-iterations", str(args.eplb_rebalance_num_iterations)]
    if args.eplb_rebalance_layers_per_chunk is not None:
        extra += ["--eplb-rebalance-layers-per-chunk", str(args.eplb_rebalance_layers_per_chunk)]
    if args.elastic_ep_backend != "none":
        extra += ["--elastic-ep-backend", args.elastic_ep_backend]
    return extra
