"""`./run.sh lab`: JupyterLab on notebooks/ with the project's kernel, bound to 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def outside_address() -> str | None:
    """This machine's address on its first non-loopback interface (a UDP "connect" sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.slow
def test_run_sh_lab_serves_the_templates_with_the_medcert_kernel():
    port, token = free_port(), "medcert-test"
    environment = {**os.environ, "MEDCERT_VENV": str(Path(sys.prefix).relative_to(REPO))
                   if Path(sys.prefix).is_relative_to(REPO) else ".venv"}
    server = subprocess.Popen([str(REPO / "run.sh"), "lab", "--port", str(port), f"--IdentityProvider.token={token}"],
                              cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}/api"
        deadline, specs = time.monotonic() + 120, None
        while time.monotonic() < deadline and specs is None:
            try:
                with urllib.request.urlopen(f"{base}/kernelspecs?token={token}", timeout=5) as response:
                    specs = json.load(response)
            except OSError:
                assert server.poll() is None, server.stdout.read().decode(errors="replace")[-2000:]
                time.sleep(1)
        assert specs is not None, "JupyterLab did not answer within 120 s"
        kernel = specs["kernelspecs"]["medcert"]["spec"]
        assert Path(kernel["argv"][0]).resolve().parent == Path(sys.executable).resolve().parent
        with urllib.request.urlopen(f"{base}/contents?token={token}", timeout=5) as response:
            names = {item["name"] for item in json.load(response)["content"]}
        assert {"phantom.ipynb", "jsrt.ipynb"} <= names, "JupyterLab serves notebooks/"
        outside = outside_address()
        if outside is not None:  # bound to the loopback interface only
            with pytest.raises(OSError):
                socket.create_connection((outside, port), timeout=2).close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
