"""benchmarks/soak_bench.py's open-loop client against a real uvicorn on 127.0.0.1 (issue 13's soak figure).

A pooled keep-alive connection that the server has closed, or that sat idle past the client's expiry, must be
dropped before reuse, not written into: otherwise the soak counts the client's own stale-connection race as
connection errors of the server.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import uvicorn

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    return load_script("soak_bench")


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the request body and answers 200 with a small body."""
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def serve(keep_alive_s: int) -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            ok_app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=keep_alive_s, lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def short_keep_alive() -> Iterator[int]:
    yield from serve(keep_alive_s=1)


@pytest.fixture
def long_keep_alive() -> Iterator[int]:
    yield from serve(keep_alive_s=60)


async def two_bursts(soak: ModuleType, port: int, pause_s: float) -> Any:
    loop = soak.OpenLoop(port, soak.request_bytes("/x", b"payload"), max_connections=8)
    for _ in range(2):
        await asyncio.gather(*(loop.one() for _ in range(6)))
        await asyncio.sleep(pause_s)
    await loop.drain()
    return loop


def test_connections_the_server_closed_are_dropped_not_reused(soak: ModuleType, short_keep_alive: int) -> None:
    # the server closes idle connections after 1 s; the client's expiry (4 s by default) has not passed
    loop = asyncio.run(two_bursts(soak, short_keep_alive, pause_s=1.6))
    assert loop.tally.statuses == {"200": 12}  # no connection_error on the second burst
    assert loop.tally.expired == 6  # each connection of the first burst was seen closed and dropped
    assert loop.open == 6  # the second burst's connections, the dropped ones no longer counted


def test_connections_idle_past_the_expiry_are_dropped(
    soak: ModuleType, long_keep_alive: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(soak, "KEEP_ALIVE_EXPIRY_S", 0.3)  # the server would keep them for 60 s
    loop = asyncio.run(two_bursts(soak, long_keep_alive, pause_s=0.5))
    assert loop.tally.statuses == {"200": 12} and loop.tally.expired == 6


def test_fresh_pooled_connections_are_reused(soak: ModuleType, long_keep_alive: int) -> None:
    loop = asyncio.run(two_bursts(soak, long_keep_alive, pause_s=0.1))
    assert loop.tally.statuses == {"200": 12} and loop.tally.expired == 0
    assert loop.open == 6  # the second burst reused the first burst's six connections


def test_the_expiry_sits_below_uvicorns_keep_alive(soak: ModuleType) -> None:
    assert uvicorn.Config(ok_app).timeout_keep_alive == soak.SERVER_KEEP_ALIVE_S
    assert 0 < soak.KEEP_ALIVE_EXPIRY_S < soak.SERVER_KEEP_ALIVE_S
