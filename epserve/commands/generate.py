"""``epserve generate``: print a completion to stdout (logs go to stderr).

Two modes: ``--model-path DIR`` runs the colocated engine in this process
(``--moe-a2a-backend local``); ``--gateway HOST:PORT`` streams from a running deployment.
"""

from __future__ import annotations

import argparse
import sys

from epserve.sampling import DEFAULT_SAMPLING, SamplingParams


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="generate a completion (colocated with --model-path, or through --gateway)",
        description="Generate a completion for --prompt and print only the completion text to stdout.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-path", help="HF model directory: run attention and experts in this process")
    where.add_argument("--gateway", metavar="HOST:PORT", help="address of a running epserve gateway")
    parser.add_argument("--prompt", required=True, help="prompt text")
    defaults = DEFAULT_SAMPLING
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help="tokens to generate at most (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="0 = greedy (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=defaults.top_p,
                        help="nucleus sampling mass in (0, 1] (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=defaults.top_k,
                        help="sample from the k most likely tokens; 0 = off")
    parser.add_argument("--min-p", type=float, default=defaults.min_p,
                        help="drop tokens below min_p × the top probability")
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                        help="> 1 discourages repeats")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed for reproducible output")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable; gateway mode)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    parser.add_argument("--dtype", default="bfloat16", choices=["float64", "float32", "bfloat16", "float16"],
                        help="weights/activations dtype in colocated mode (default bfloat16)")
    parser.add_argument("--device", default="cpu", help="torch device in colocated mode (default cpu)")
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                        help="weights in colocated mode: auto (default) and safetensors read the checkpoint; "
                             "dummy draws random weights on --device from a fixed seed (the values `epserve up "
                             "--load-format dummy` serves) and reads only config.json and the tokenizer from "
                             "--model-path")
    parser.add_argument("--moe-runner-backend", default="auto", help="expert kernels in colocated mode")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch CPU threads in colocated mode (default 1: small models are latency-bound "
                             "and extra OpenMP threads only contend)")
    engine = parser.add_argument_group("engine in colocated mode (SGLang's names, as on the attention worker)")
    engine.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch_native"],
                        help="triton = batched GPU runner (Triton paged attention, CUDA graphs for decode, GPU "
                             "sampling); torch_native = host runner (per-sequence SDPA); auto (default) = triton on "
                             "CUDA devices, torch_native elsewhere")
    engine.add_argument("--cuda-graph-max-bs", type=int, default=256,
                        help="with the triton backend, decode steps of up to this many sequences replay a captured "
                             "CUDA graph; larger ones run eagerly (default 256)")
    engine.add_argument("--disable-cuda-graph", action="store_true",
                        help="with the triton backend, run every step eagerly (no graph capture at start-up)")
    engine.add_argument("--disable-overlap-schedule", action="store_true",
                        help="with the triton backend and experts in this process, never launch a decode step before "
                             "the step before it has finished (by default the next step is queued while the host reads "
                             "the last one's tokens)")
    engine.add_argument("--max-running-requests", type=int, default=64, help="sequences in flight at most (default 64)")
    engine.add_argument("--num-kv-blocks", type=int, default=512,
                        help="KV cache blocks (default 512); a prompt plus --max-new-tokens must fit")
    engine.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="token budget of one step; longer prefills are split into chunks (default 2048)")
    engine.add_argument("--context-length", type=int, default=0, help="context limit; 0 = the model's (default)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait in gateway mode")
    parser.add_argument("--api-token-file", default="", metavar="FILE",
                        help="gateway mode: the token the gateway's API asks for (its --api-token-file)")
    parser.add_argument("--tls-ca", default="", metavar="PEM", help="gateway mode: trust the gateway through this CA")
    parser.add_argument("--tls-cert", default="", metavar="PEM", help="gateway mode: client certificate (mTLS)")
    parser.add_argument("--tls-key", default="", metavar="PEM", help="gateway mode: its private key")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.gateway:
        return _run_client(args)
    return _run_colocated(args)


def engine_limits(args: argparse.Namespace):
    """The colocated engine's ``EngineLimits`` from the flags; ValueError naming the flag."""
    from epserve.attention_worker.config import check_engine_limits
    from epserve.attention_worker.engine import EngineLimits

    limits = EngineLimits(num_kv_blocks=args.num_kv_blocks, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_num_seqs=args.max_running_requests, cuda_graph_max_bs=args.cuda_graph_max_bs,
                          disable_cuda_graph=args.disable_cuda_graph,
                          disable_overlap_schedule=args.disable_overlap_schedule,
                          attention_backend=args.attention_backend)
    check_engine_limits(limits, args.context_length)
    return limits


def _run_colocated(args: argparse.Namespace) -> int:
    from epserve.attention_worker.colocated import build_colocated_engine
    from epserve.model_config import ModelConfigError
    from epserve.tokenizer import Tokenizer
    from epserve.weights import parse_dtype

    import torch

    torch.set_num_threads(args.num_threads)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                                max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos)
        limits = engine_limits(args)
        tokenizer = Tokenizer.from_dir(args.model_path)
        engine = build_colocated_engine(args.model_path, parse_dtype(args.dtype), args.device,
                                        args.moe_runner_backend, limits, max_context=args.context_length,
                                        load_format=args.load_format)
        prompt_ids = tokenizer.encode(args.prompt)
        if not prompt_ids:
            raise ValueError("--prompt encodes to no tokens")
        engine.add_request("0", prompt_ids, params)
    except (ValueError, ModelConfigError) as exc:
        print(f"epserve generate: {exc}", file=sys.stderr)
        return 2
    generated: list[int] = []
    printed = ""
    while engine.has_work:
        for out in engine.step():
            generated.extend(out.new_token_ids)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd") and text.startswith(printed):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    final = tokenizer.decode(generated)
    sys.stdout.write(final[len(printed):] if final.startswith(printed) else "")
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0


def _run_client(args: argparse.Namespace) -> int:
    import grpc

    from epserve.gateway.client import stream_generate
    from epserve.grpc_security import Security, read_token_file

    try:
        security = Security(read_token_file(args.api_token_file) if args.api_token_file else "", args.tls_cert,
                            args.tls_key, args.tls_ca)
    except ValueError as exc:
        print(f"epserve generate: {exc}", file=sys.stderr)
        return 2
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                    stop=args.stop, ignore_eos=args.ignore_eos)
    if args.seed is not None:
        sampling["seed"] = args.seed
    try:
        for response in stream_generate(args.gateway, prompt=args.prompt, timeout_s=args.timeout, security=security,
                                        **sampling):
            sys.stdout.write(response.text)
            sys.stdout.flush()
    except grpc.RpcError as exc:
        print(f"\nepserve generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0
