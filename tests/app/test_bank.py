"""The bank overlay under crashes (issue 15): a process SIGKILLed in the middle of a write loses nothing
it acknowledged and leaves nothing half-written to serve; a real server killed with -9 on 127.0.0.1
during updates restarts with every acknowledged example."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from app.bank import Example, OverlayStore
from tests.app.routes.test_examples import files, yellow
from tests.app.servers import free_port, stop, wait_ready

IDENTITY = {"encoder_sha256": "e" * 64, "bank_sha256": "b" * 64}
DIM = 8

# The child saves versions 1, 2, 3, ... of a deterministic record and prints "ack <v>" after each save
# returns. It SIGKILLs itself at one chosen point of the third save: in the middle of writing a file
# (half the bytes written), or just before the n-th fsync of that save (data written, not replaced).
CHILD = textwrap.dedent("""
    import builtins, os, signal, sys, torch
    from app import bank
    from tests.app.test_bank import IDENTITY, DIM, record
    folder, point = sys.argv[1], sys.argv[2]
    store = bank.OverlayStore(bank.Path(folder), "m", IDENTITY)
    state = {"save": 0, "fsync": 0, "open": 0}
    real_fsync, real_open = os.fsync, builtins.open

    def die_if(kind, n):
        if state["save"] == 3 and point == f"{kind}{n}":
            os.kill(os.getpid(), signal.SIGKILL)

    def fsync(fd):
        state["fsync"] += 1
        die_if("fsync", state["fsync"])
        return real_fsync(fd)

    class HalfFile:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): return self.f.__exit__(*a)
        def write(self, data):
            self.f.write(data[: len(data) // 2]); self.f.flush()
            die_if("write", state["open"])
            return self.f.write(data[len(data) // 2:])
        def __getattr__(self, k): return getattr(self.f, k)

    def opener(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode:
            state["open"] += 1
            return HalfFile(f)
        return f

    bank.os.fsync = fsync
    bank.open = opener  # app.bank's module global shadows the builtin
    for v in range(1, 6):
        state.update(save=v, fsync=0, open=0)
        store.save(v, *record(v))
        print("ack", v, flush=True)
""")


def record(v: int) -> tuple[list[str], list[Example], torch.Tensor]:
    """Version v: v * 3 examples (classes c0.., rows of value id) - any mix of two versions is detectable."""
    g = torch.Generator().manual_seed(v)
    examples = [Example(f"id{v}-{i}", f"c{i % 2}", "t", f"f{i}.png", f"{i:064x}") for i in range(v * 3)]
    return ["c0", "c1"], examples, torch.randn(v * 3, DIM, generator=g)


# the third save: 1st open/write is the embeddings file, 2nd the manifest; fsyncs: file, folder, file, folder
POINTS = ["write1", "fsync1", "fsync2", "write2", "fsync3", "fsync4"]


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_during_a_write_loses_nothing_acknowledged(tmp_path: Path, point: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), point], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    acked = [int(line.split()[1]) for line in proc.stdout.splitlines()]
    assert acked == [1, 2]  # killed in the third save
    loaded = OverlayStore(tmp_path, "m", IDENTITY).load(DIM)
    assert loaded is not None
    version, classes, examples, z = loaded
    # the last acknowledged version, or (killed after the manifest was replaced) the complete new one
    assert version in ((2, 3) if point == "fsync4" else (2,))
    want_classes, want_examples, want_z = record(version)
    assert classes == want_classes and examples == want_examples and torch.equal(z, want_z)
    assert not list(tmp_path.glob(".*tmp*"))  # load() removed the crash's temp files
    # and the next save works over whatever the crash left
    OverlayStore(tmp_path, "m", IDENTITY).save(7, *record(7))
    assert OverlayStore(tmp_path, "m", IDENTITY).load(DIM)[0] == 7  # type: ignore[index]
    assert len(list(tmp_path.glob("examples-*.safetensors"))) == 1


def test_overlay_of_another_artifact_or_format_is_refused(tmp_path: Path) -> None:
    from app.bank import OverlayError

    OverlayStore(tmp_path, "m", IDENTITY).save(1, *record(1))
    with pytest.raises(OverlayError, match="another version of the artifact"):
        OverlayStore(tmp_path, "m", {**IDENTITY, "encoder_sha256": "0" * 64}).load(DIM)
    with pytest.raises(OverlayError, match=r"embeddings \(3, 8\), expected \(3, 4\)"):
        OverlayStore(tmp_path, "m", IDENTITY).load(4)
    doc = json.loads((tmp_path / "overlay.json").read_text())
    (tmp_path / "overlay.json").write_text(json.dumps({**doc, "format_version": 9}))
    with pytest.raises(OverlayError, match="unknown format_version 9"):
        OverlayStore(tmp_path, "m", IDENTITY).load(DIM)


def test_real_server_killed_during_updates_keeps_every_acknowledged_example(good_root: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATML_")}
    env.update(SATML_STATE_DIR=str(tmp_path / "state"), SATML_EXAMPLES_OPEN="true", SATML_HOST="127.0.0.1")
    logs = tmp_path / "server.log"

    def start() -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "app.serve", "--port", str(port), "--host", "127.0.0.1",
                                 "--artifacts-dir", str(good_root)], env=env, stdout=logs.open("ab"),
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        wait_ready(lambda: proc.poll() is None, f"{url}/health/ready", poll_s=0.2)
        return proc, url

    proc, url = start()
    acked: list[str] = []
    halt = threading.Event()

    def writer() -> None:  # updates back to back until the server dies under them
        i = 0
        with httpx.Client(base_url=url, timeout=10) as c:
            while not halt.is_set():
                try:
                    r = c.post("/models/default/examples", data={"label": "yellow"}, files=files(yellow(2, i)))
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    acked.extend(r.json()["ids"])
                i += 1

    t = threading.Thread(target=writer, daemon=True)
    try:
        t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 6 and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.01)
        assert len(acked) >= 6, "the server acknowledged too few updates"
        proc.send_signal(signal.SIGKILL)  # while the writer keeps a request in flight
        proc.wait(10)
        halt.set()
        t.join(15)
        assert not t.is_alive()
        proc, url = start()
        listed = httpx.get(f"{url}/models/default/examples", timeout=10).json()
        ids = [e["id"] for e in listed["examples"]]
        assert set(acked) <= set(ids), "an acknowledged example was lost"
        assert len(ids) - len(acked) <= 2  # at most the one request in flight (acked on disk, never answered)
        assert listed["bank_size"] == 192 + len(ids) and listed["version"] == len(ids) // 2
        images = yellow(2, 999)
        r = httpx.post(f"{url}/classify", files=files(images), timeout=10)
        assert [res["label"] for res in r.json()["results"]] == ["yellow", "yellow"]
        assert np.all([e["label"] == "yellow" for e in listed["examples"]])
    finally:
        halt.set()
        stop(proc)
