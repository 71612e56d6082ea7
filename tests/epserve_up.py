"""``epserve up`` as a real process for end-to-end tests: start it, read its endpoints, stop it.

    from epserve_up import epserve_up

    with epserve_up(["--model-path", str(model), "--dtype", "float64"], tmp_path) as endpoints:
        generate(endpoints["gateway"], ...)

The deployment prints one ``NAME ADDRESS`` line per endpoint once it is ready; the context manager
yields them as a dict, then sends SIGTERM and checks that ``epserve up`` exited with 0 (its
stderr and the children's logs are in ``log_dir``, shown when something fails). The deployment runs
without a token (``--no-auth-token``) so tests may call placement directly; ``auth=True`` keeps
``epserve up``'s default (a token in ``$EPSERVE_CACHE_DIR/auth_token``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ENDPOINTS = ("gateway", "placement")


@contextlib.contextmanager
def epserve_up(args: list[str], log_dir: Path, start_timeout_s: float = 240.0, auth: bool = False,
               env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "up.log"
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    auth_args = [] if auth else ["--no-auth-token"]
    with open(log, "w") as stderr:
        up = subprocess.Popen([sys.executable, "-m", "epserve", "up", "--port", "0", "--log-dir", str(log_dir),
                               *auth_args, *args],
                              stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO_ROOT, env=env)
    try:
        endpoints: dict[str, str] = {}
        deadline = time.monotonic() + start_timeout_s
        while len(endpoints) < len(ENDPOINTS) and time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, f"epserve up exited before printing its endpoints:\n{log.read_text()[-4000:]}"
            name, _, rest = line.partition(" ")
            if name in ENDPOINTS:
                endpoints[name] = rest.split()[0]
        assert len(endpoints) == len(ENDPOINTS), f"no endpoints within {start_timeout_s} s:\n{log.read_text()[-4000:]}"
        yield endpoints
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    assert up.returncode == 0, log.read_text()[-4000:]
