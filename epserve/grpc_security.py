"""Who may call an epserve gRPC endpoint, and over what: the deployment's token and TLS.

Token: one shared secret per deployment (``--auth-token-file FILE``, or ``--auth-token TOKEN``,
which other users of the machine can read in the process list). Every call a process makes
carries it as gRPC metadata ``authorization: Bearer <token>`` (``open_channel``); a server given a
token answers a call without it, or with another, UNAUTHENTICATED (``grpc_guard.py``); health
and reflection stay open, so probes need no secret. A token file must be readable by its owner
only (mode 0600): ``read_token_file`` refuses it otherwise. ``ensure_token_file`` makes one.

TLS: ``--tls-cert`` + ``--tls-key`` (PEM) make a server speak TLS; ``--tls-ca`` also makes it
require client certificates signed by that CA (mTLS). As a client, a process speaks TLS when it
has a certificate or a CA: it trusts ``--tls-ca`` (or, without one, its own certificate: one
self-signed certificate for the whole deployment) and presents its certificate when it has one.
Addresses are dialled as advertised (e.g. ``127.0.0.1:port``): the certificate must name that host
(an IP subjectAltName for addresses given as IPs).
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

METADATA_KEY = "authorization"
SCHEME = "Bearer "
TOKEN_FILE_NAME = "auth_token"


@dataclass(frozen=True)
class Security:
    """The token and TLS files of one process (all empty: no token, plaintext)."""
    token: str = ""
    tls_cert: str = ""        # PEM certificate chain of this process
    tls_key: str = ""         # its PEM private key
    tls_ca: str = ""          # PEM CA: servers require client certificates signed by it; clients trust it

    def __post_init__(self) -> None:
        if self.token and (not self.token.isascii() or not self.token.isprintable() or " " in self.token):
            raise ValueError("the auth token must be printable ASCII without spaces (it travels as gRPC metadata)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both (PEM files) or neither")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key), ("--tls-ca", self.tls_ca)):
            if path and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")

    @property
    def tls(self) -> bool:
        """Whether calls to this deployment use TLS."""
        return bool(self.tls_cert or self.tls_ca)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for a server (mTLS with ``tls_ca``); None = plaintext."""
        if not self.tls_cert:
            if self.tls_ca:
                raise ValueError("--tls-ca without --tls-cert/--tls-key: a server needs its own certificate to "
                                 "speak TLS")
            return None
        ca = _read(self.tls_ca) if self.tls_ca else None
        return grpc.ssl_server_credentials([(_read(self.tls_key), _read(self.tls_cert))], root_certificates=ca,
                                           require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        roots = _read(self.tls_ca) if self.tls_ca else _read(self.tls_cert)
        if self.tls_cert:
            return grpc.ssl_channel_credentials(roots, _read(self.tls_key), _read(self.tls_cert))
        return grpc.ssl_channel_credentials(roots)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries (nothing without a token)."""
        return ((METADATA_KEY, SCHEME + self.token),) if self.token else ()


PLAINTEXT = Security()


def open_channel(address: str, security: Security = PLAINTEXT, options: Sequence[tuple] = ()) -> grpc.Channel:
    """A channel to ``address``: TLS when ``security`` has a certificate or CA, and every call carrying the
    token when it has one."""
    if security.tls:
        channel = grpc.secure_channel(address, security.channel_credentials(), options=list(options))
    else:
        channel = grpc.insecure_channel(address, options=list(options))
    if security.token:
        channel = grpc.intercept_channel(channel, TokenClientInterceptor(security.metadata()))
    return channel


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the token to every call's metadata."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), *self._metadata],
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


# -- token files ---------------------------------------------------------------------------------
def default_cache_dir(environ: dict[str, str] | None = None) -> Path:
    """``$EPSERVE_CACHE_DIR``, else ``~/.cache/epserve`` (where ``epserve up`` keeps the tiny model, state and token)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("EPSERVE_CACHE_DIR") or os.path.expanduser("~/.cache/epserve"))


def default_token_path(environ: dict[str, str] | None = None) -> Path:
    return default_cache_dir(environ) / TOKEN_FILE_NAME


def read_token_file(path: str | Path) -> str:
    """The token in ``path``; ValueError when it is missing, empty, or readable by other users."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"auth token file {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"auth token file {path} is open to other users (mode {stat.S_IMODE(mode):o}): "
                         f"run chmod 600 {path}")
    if not text:
        raise ValueError(f"auth token file {path} is empty")
    return text


def ensure_token_file(path: str | Path) -> str:
    """The token in ``path``, made first (a random 256-bit token, mode 0600) when the file does not exist.
    Safe against a concurrent caller: the file is created exclusively, the loser reads the winner's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token_file(path)
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_urlsafe(32) + "\n")
    return read_token_file(path)


# -- flags ---------------------------------------------------------------------------------------
def add_security_arguments(parser: argparse.ArgumentParser, *, token_help: str = "") -> None:
    """``--auth-token``, ``--auth-token-file``, ``--tls-cert``, ``--tls-key``, ``--tls-ca``."""
    group = parser.add_argument_group("security (docs/operations.md, \"Security\")")
    group.add_argument("--auth-token", default="", metavar="TOKEN",
                       help=(token_help or "the deployment's token: calls to this process must carry it, and its "
                             "calls to others carry it (gRPC metadata authorization: Bearer TOKEN)")
                       + "; visible in the process list, prefer --auth-token-file")
    group.add_argument("--auth-token-file", default="", metavar="FILE",
                       help="read --auth-token from FILE (readable by its owner only, mode 0600)")
    group.add_argument("--tls-cert", default="", metavar="PEM", help="this process's TLS certificate (chain)")
    group.add_argument("--tls-key", default="", metavar="PEM", help="its private key")
    group.add_argument("--tls-ca", default="", metavar="PEM",
                       help="CA of the deployment: servers require client certificates it signed (mTLS), clients "
                            "trust servers it signed (without it a client trusts --tls-cert itself)")


def security_from_args(args: argparse.Namespace) -> Security:
    """ValueError naming the flag."""
    if args.auth_token and args.auth_token_file:
        raise ValueError("give --auth-token or --auth-token-file, not both")
    token = read_token_file(args.auth_token_file) if args.auth_token_file else args.auth_token
    return Security(token=token, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca)


def security_args(security: Security, token_file: str | Path | None) -> list[str]:
    """The flags that hand ``security`` to a child process (the token through its file, never the command line)."""
    args = ["--auth-token-file", str(token_file)] if token_file else []
    for flag, value in (("--tls-cert", security.tls_cert), ("--tls-key", security.tls_key),
                        ("--tls-ca", security.tls_ca)):
        if value:
            args += [flag, value]
    return args


def _read(path: str) -> bytes:
    return Path(path).read_bytes()
