"""Real servers in tests: wait until one answers ready (a subprocess or a uvicorn thread on 127.0.0.1)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx

START_TIMEOUT_S = 90  # importing torch on a loaded 2-core machine is slow


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """SIGTERM a server process (if it still runs), SIGKILL it when it outlives `timeout_s`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_ready(alive: Callable[[], bool], ready_url: str, timeout_s: float = START_TIMEOUT_S,
               poll_s: float = 0.1) -> None:
    """Poll `ready_url` until it answers 200; fail if `alive()` turns False (the server process or thread
    ended) or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert alive(), "the server stopped during start-up"
        assert time.monotonic() < deadline, f"server not ready after {timeout_s:g} s"
        time.sleep(poll_s)
