"""What ``epserve up`` checks before it starts any process, so a misconfiguration is one line of
error at once rather than a child that dies seconds later with the reason in its log.

``check_deployment(config)`` raises ``ValueError`` with a message that names the flag or file:
  ports       each in 0..65535; the gateway and placement ports differ; a fixed port is free on --host
  model       config.json parses (the model families' own validation) and tokenizer.json is there
  experts     (experts + redundant) divide evenly by the expert workers
  weights     unless --load-format dummy: the checkpoint's files exist and no safetensors file is
              shorter than its header says (a truncated download or copy)
  log dir     can be written
(Token and TLS files are checked by ``grpc_security.Security`` when the config is built.)
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

from epserve.deployment_config import DeploymentConfig

HEADER_LIMIT = 100 << 20        # a safetensors header (JSON) longer than this is not a real one


def check_deployment(config: DeploymentConfig) -> None:
    check_ports(config.host, {"--port": config.gateway_port, "--placement-port": config.placement_port})
    spec = _check_model(config.model_path)
    if not config.colocated:
        slots = spec.num_experts + config.num_redundant_experts
        if slots % config.num_expert_workers:
            fits = config.num_redundant_experts + (-slots) % config.num_expert_workers
            raise ValueError(f"--ep-num-redundant-experts {config.num_redundant_experts}: {spec.num_experts} experts + "
                             f"{config.num_redundant_experts} = {slots} slots do not split evenly over "
                             f"{config.num_expert_workers} expert workers; use e.g. --ep-num-redundant-experts {fits}")
    if config.load_format != "dummy":
        check_checkpoint(config.model_path)
    if config.log_dir:
        _check_writable(Path(config.log_dir), "--log-dir")


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Each port in range; fixed ones distinct and free on ``host`` (0 = picked at start)."""
    for flag, port in ports.items():
        if not 0 <= port <= 65535:
            raise ValueError(f"{flag} {port} is not a port: choose 1..65535, or 0 to pick a free one")
    fixed = {flag: port for flag, port in ports.items() if port}
    seen: dict[int, str] = {}
    for flag, port in fixed.items():
        if port in seen:
            raise ValueError(f"{seen[port]} and {flag} are both {port}: every process needs a port of its own")
        seen[port] = flag
        _check_free(host, port, flag)


def check_checkpoint(model_path: str | Path) -> None:
    """Every safetensors file of the checkpoint exists and holds at least the bytes its header describes."""
    directory = Path(model_path)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"--model-path {directory}: neither model.safetensors nor model.safetensors.index.json "
                         "(use --load-format dummy to serve random weights without a checkpoint)")
    for name in files:
        _check_safetensors(directory / name)


def _check_safetensors(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing (listed in the index)")
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ValueError(f"checkpoint file {path} is truncated: {size} bytes, not even a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(HEADER_LIMIT, size - 8):
            raise ValueError(f"checkpoint file {path} is truncated or not safetensors: its header claims "
                             f"{header_len} bytes, the file has {size}")
        try:
            header = json.loads(file.read(header_len))
        except ValueError as exc:
            raise ValueError(f"checkpoint file {path}: unreadable safetensors header ({exc})") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise ValueError(f"checkpoint file {path} is truncated: {size} bytes, its header describes {needed} "
                         "(copy or download it again)")


def _check_model(model_path: str):
    from epserve.model_config import ModelConfigError, load_model_spec

    try:
        spec = load_model_spec(model_path)
    except (ModelConfigError, OSError, ValueError) as exc:
        raise ValueError(f"--model-path {model_path}: {exc}") from None
    if not (Path(model_path) / "tokenizer.json").is_file():
        raise ValueError(f"--model-path {model_path}: no tokenizer.json (the gateway tokenizes with it)")
    return spec


def _check_free(host: str, port: int, flag: str) -> None:
    bind_host = "" if host in ("", "0.0.0.0", "::", "[::]") else host.strip("[]")
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as gRPC: a port in TIME_WAIT is free
        try:
            sock.bind((bind_host, port))
        except OSError as exc:
            raise ValueError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); choose "
                             "another port, or 0 to pick a free one") from None


def _check_writable(directory: Path, flag: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".epserve-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"{flag} {directory}: cannot write there ({exc.strerror or exc})") from None
