"""vLLM's OpenAI-compatible server, started from selfie's vLLM environment on the loopback interface for a test."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STARTUP_S = 300  # ~40-60 s on 2 idle cores; more beside another busy process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    name: str  # the served model's name
    log: Path  # the server's output, its access log included

    def posts(self, route: str) -> int:
        """How many POSTs to `route` the server has answered so far."""
        return self.log.read_text(errors="replace").count(f'"POST {route} HTTP/1.1"')


@contextlib.contextmanager
def vllm_server(python: str, model: str | Path, name: str, log: Path, *flags: str) -> Iterator[Server]:
    port = free_port()
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", name]
    command += ["--dtype", "float32", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port), *flags]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as out:
        # its own working directory: a `z3` directory in the caller's would shadow the solver torch.compile imports
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", name, log)
    try:
        wait_healthy(process, server)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait()


def wait_healthy(process: subprocess.Popen, server: Server) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM's server exited ({process.returncode}):\n{server.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{server.url}/health", timeout=5):
                return
        time.sleep(1)
    raise RuntimeError(f"vLLM's server did not answer /health in {STARTUP_S} s:\n{server.log.read_text()[-3000:]}")
