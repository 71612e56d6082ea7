"""The gateway's one config object, its command-line flags, and their validation."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from epserve.grpc_security import Security, add_security_arguments, read_token_file, security_from_args
from epserve.process_flags import add_bind_arguments, add_telemetry_arguments, config_defaults, config_kwargs

PORT_LINE = "GATEWAY_PORT"


def check_address(flag: str, address: str) -> str:
    """``host:port`` (IPv6 as ``[::1]:port``) with a port in 1..65535, else ValueError naming ``flag``."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{flag}: {address!r} is not HOST:PORT with a port in 1..65535")
    return address.strip()


@dataclass(frozen=True)
class GatewayConfig:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 0                                   # 0 = pick a free port (printed as GATEWAY_PORT=)
    placement: str | None = None                    # placement service HOST:PORT (worker discovery)
    attention_workers: tuple[str, ...] = ()         # static HOST:PORT list
    max_new_tokens_limit: int = 4096
    request_timeout_s: float = 600.0                # whole-request deadline
    rpc_timeout_s: float = 5.0                      # deadline of every unary RPC (Abort, GetLoad, ListWorkers)
    refresh_interval_s: float = 1.0                 # placement re-listing and worker probes
    max_retries: int = 3                            # re-submissions after losing a worker, per request
    max_worker_failures: int = 2                    # poison-request guard: workers a request may lose or fail on
    max_concurrent_requests: int = 256
    max_pending_prompts: int = 64                   # prompts tokenizing or waiting for the tokenizer
    max_prompt_bytes: int = 1 << 20                 # UTF-8 bytes of a text prompt, checked before tokenizing
    max_message_bytes: int = 4 << 20                # largest gRPC message a client may send
    tokenizer_processes: int = 1                    # tokenize in this many processes; 0 = on the RPC's thread
    auth_token: str = field(default="", repr=False)  # the deployment's token (sent to workers and placement)
    tls_cert: str = ""                              # TLS of the deployment (grpc_security.py)
    tls_key: str = ""
    tls_ca: str = ""
    api_token: str = field(default="", repr=False)  # clients of the Generation API must send it; "" = open
    shutdown_grace_s: float = 10.0
    metrics_port: int | None = None                 # Prometheus /metrics; None = off, 0 = a free port
    otlp_endpoint: str = ""                         # OTLP gRPC collector HOST:PORT; "" = no tracing
    sglang_default_seed: int | None = None          # SglangScheduler requests without a seed: this one (None: random)

    def __post_init__(self) -> None:
        path = Path(self.model_path)
        for name in ("config.json", "tokenizer.json"):
            if not (path / name).is_file():
                raise ValueError(f"--model-path {self.model_path}: {name} not found there")
        if not self.host:
            raise ValueError("--host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535 (0 = pick a free one), got {self.port}")
        if self.placement is None and not self.attention_workers:
            raise ValueError("give --placement HOST:PORT and/or --attention-workers HOST:PORT[,HOST:PORT...]")
        if self.placement is not None:
            check_address("--placement", self.placement)
        for address in self.attention_workers:
            check_address("--attention-workers", address)
        if len(set(self.attention_workers)) != len(self.attention_workers):
            raise ValueError(f"--attention-workers lists an address twice: {','.join(self.attention_workers)}")
        if self.max_new_tokens_limit < 1:
            raise ValueError(f"--max-new-tokens-limit must be >= 1, got {self.max_new_tokens_limit}")
        for flag, value in (("--request-timeout-s", self.request_timeout_s), ("--rpc-timeout-s", self.rpc_timeout_s),
                            ("--refresh-interval-s", self.refresh_interval_s)):
            if not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"--shutdown-grace-s must be >= 0, got {self.shutdown_grace_s}")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.max_concurrent_requests < 1:
            raise ValueError(f"--max-concurrent-requests must be >= 1, got {self.max_concurrent_requests}")
        if self.max_worker_failures < 1:
            raise ValueError(f"--max-worker-failures must be >= 1, got {self.max_worker_failures}")
        for flag, value, least in (("--max-pending-prompts", self.max_pending_prompts, 1),
                                   ("--max-prompt-bytes", self.max_prompt_bytes, 1),
                                   ("--max-message-bytes", self.max_message_bytes, 64 * 1024),
                                   ("--tokenizer-processes", self.tokenizer_processes, 0)):
            if value < least:
                raise ValueError(f"{flag} must be >= {least}, got {value}")
        self.security  # noqa: B018 - checks the token and TLS files
        if self.max_message_bytes <= self.max_prompt_bytes:
            raise ValueError(f"--max-message-bytes ({self.max_message_bytes}) must exceed --max-prompt-bytes "
                             f"({self.max_prompt_bytes}): a prompt travels in one message")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        if self.sglang_default_seed is not None and not 0 <= self.sglang_default_seed < 2 ** 63:
            raise ValueError(f"--sglang-default-seed must be in [0, 2**63), got {self.sglang_default_seed}")


    @property
    def security(self) -> Security:
        """The token and TLS this gateway's calls to workers and placement use."""
        return Security(self.auth_token, self.tls_cert, self.tls_key, self.tls_ca)


def build_parser() -> argparse.ArgumentParser:
    defaults = config_defaults(GatewayConfig)
    parser = argparse.ArgumentParser(
        prog="python -m epserve.gateway",
        description="epserve gateway: serves the public epserve.v1.Generation gRPC API (plus grpc.health.v1 "
                    "and reflection), tokenizes, routes each request to the attention worker with the fewest "
                    "outstanding tokens, streams text back, and re-submits a request elsewhere when its "
                    "worker is lost. Prints GATEWAY_PORT=<port> on stdout once serving; logs go to stderr.")
    parser.add_argument("--model-path", required=True, metavar="DIR",
                        help="model directory: tokenizer.json, tokenizer_config.json (add_bos_token), config.json "
                             "(max_position_embeddings = context limit, vocab_size), generation_config.json (EOS ids)")
    add_bind_arguments(parser, defaults, PORT_LINE)
    parser.add_argument("--placement", metavar="HOST:PORT", default=defaults["placement"],
                        help="placement service to discover attention workers from (PlacementAdmin.ListWorkers: "
                             "role ATTENTION, state ALIVE), re-listed every --refresh-interval-s")
    parser.add_argument("--attention-workers", metavar="HOST:PORT[,HOST:PORT...]", default="",
                        help="static attention workers (used together with --placement when both are given)")
    parser.add_argument("--max-new-tokens-limit", type=int, default=defaults["max_new_tokens_limit"],
                        help="largest max_new_tokens a request may ask for (default: %(default)s; a request's "
                             "default is 128; generation also stops when the context is full)")
    parser.add_argument("--request-timeout-s", type=float, default=defaults["request_timeout_s"],
                        help="deadline of a whole request, prompt to last token; the client's own deadline "
                             "applies when shorter (default: %(default)s)")
    parser.add_argument("--rpc-timeout-s", type=float, default=defaults["rpc_timeout_s"],
                        help="deadline of each unary RPC to workers and placement: Abort, GetLoad, ListWorkers "
                             "(default: %(default)s)")
    parser.add_argument("--refresh-interval-s", type=float, default=defaults["refresh_interval_s"],
                        help="how often to re-list workers from placement and probe each worker with GetLoad "
                             "(health is SERVING while at least one answers) (default: %(default)s)")
    parser.add_argument("--max-retries", type=int, default=defaults["max_retries"],
                        help="how many times one request may be re-submitted after losing its worker "
                             "(default: %(default)s)")
    parser.add_argument("--max-worker-failures", type=int, default=defaults["max_worker_failures"],
                        help="poison-request guard: a request whose stream broke, or that failed with INTERNAL, on "
                             "this many attention workers is failed (INTERNAL) instead of sent to another one "
                             "(default: %(default)s)")
    parser.add_argument("--max-concurrent-requests", type=int, default=defaults["max_concurrent_requests"],
                        help="streams served at once; more are refused with RESOURCE_EXHAUSTED (default: %(default)s)")
    parser.add_argument("--max-pending-prompts", type=int, default=defaults["max_pending_prompts"],
                        help="prompts being tokenized or waiting for the tokenizer; more are refused with "
                             "RESOURCE_EXHAUSTED (default: %(default)s)")
    parser.add_argument("--max-prompt-bytes", type=int, default=defaults["max_prompt_bytes"],
                        help="largest text prompt in UTF-8 bytes, checked before tokenizing; larger ones are "
                             "refused with RESOURCE_EXHAUSTED (default: %(default)s)")
    parser.add_argument("--max-message-bytes", type=int, default=defaults["max_message_bytes"],
                        help="largest gRPC message a client may send (gRPC answers RESOURCE_EXHAUSTED past it "
                             "without reading it) (default: %(default)s)")
    parser.add_argument("--tokenizer-processes", type=int, default=defaults["tokenizer_processes"],
                        help="tokenize prompts in this many helper processes, so a long prompt never holds the "
                             "threads that stream other requests' tokens; 0 = tokenize on the request's own thread "
                             "(default: %(default)s)")
    parser.add_argument("--api-token", default=defaults["api_token"], metavar="TOKEN",
                        help="clients of the Generation API must send TOKEN (gRPC metadata authorization: Bearer "
                             "TOKEN); default: the API is open (health always is); prefer --api-token-file")
    parser.add_argument("--api-token-file", default="", metavar="FILE", help="read --api-token from FILE (mode 0600)")
    add_security_arguments(parser, token_help="the deployment's token: the gateway sends it to the attention "
                                              "workers and placement")
    parser.add_argument("--shutdown-grace-s", type=float, default=defaults["shutdown_grace_s"],
                        help="on SIGTERM/SIGINT: how long in-flight streams may run to completion before they "
                             "are aborted (finish_reason ABORT) (default: %(default)s)")
    add_telemetry_arguments(parser, defaults, "epserve-gateway", PORT_LINE)
    parser.add_argument("--sglang-default-seed", type=int, default=defaults["sglang_default_seed"], metavar="SEED",
                        help="the sampling seed of SglangScheduler requests (SMG's) that bring none; sample i of "
                             "n uses SEED + i, so equal requests get equal completions (SGLang's deterministic "
                             "inference does the same with seed 42). SMG 1.13 does not forward OpenAI's seed. "
                             "Default: a random seed per sample")
    return parser


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The config from ``build_parser().parse_args(...)``; ValueError when a value is bad."""
    workers = tuple(a.strip() for a in args.attention_workers.split(",") if a.strip())
    return GatewayConfig(**config_kwargs(GatewayConfig, args, attention_workers=workers, api_token=_api_token(args),
                                         **_security_fields(args)))


def _api_token(args: argparse.Namespace) -> str:
    if args.api_token and args.api_token_file:
        raise ValueError("give --api-token or --api-token-file, not both")
    return read_token_file(args.api_token_file) if args.api_token_file else args.api_token


def _security_fields(args: argparse.Namespace) -> dict[str, str]:
    security = security_from_args(args)
    return {"auth_token": security.token, "tls_cert": security.tls_cert, "tls_key": security.tls_key,
            "tls_ca": security.tls_ca}
