"""set_process_title on real processes, read back through ps (every process's main() sets it through
epserve.process.run_process: a worker's id, ``gateway``, ``placement``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_NAME) is Linux's")

SCRIPT = ("import sys, time; from epserve.process import set_process_title; set_process_title(sys.argv[1]); "
          "print('titled', flush=True); time.sleep(60)")


def ps_field(pid: int, field: str) -> str:
    return subprocess.run(["ps", "-o", f"{field}=", "-p", str(pid)], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("name,comm", [("expert-1", "expert-1"), ("attention-0", "attention-0"),
                                       ("expert-myhost-abc123", "expert-myhost-a")])   # comm keeps 15 bytes
def test_ps_shows_role_and_id(name: str, comm: str) -> None:
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, name], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "titled"
        assert ps_field(process.pid, "comm") == comm
        assert ps_field(process.pid, "args") == f"epserve {name}"
    finally:
        process.kill()
        process.wait(timeout=10)
