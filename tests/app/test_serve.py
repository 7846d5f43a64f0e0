"""`satml-serve` as a real uvicorn process on 127.0.0.1 (ephemeral port): readiness, API, bad input, limits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.corpus import CORPUS, streamed_multipart
from tests.app.servers import free_port, stop, wait_ready
from tests.app.toy import png, toy_images

REQUEST_TIMEOUT_S = 30
N_REQUESTS = 12


@pytest.fixture(scope="module")
def server(good_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w+")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATML_")}
    env.update(SATML_MAX_UPLOAD_BYTES=str(2 * 1024 * 1024), SATML_ATTACK_MAX_STEPS="5")
    proc = subprocess.Popen([sys.executable, "-m", "app.serve", "--port", str(port), "--artifacts-dir", str(good_root),
                             "--log-level", "info"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(lambda: proc.poll() is None, f"{url}/health/ready", poll_s=0.2)
        yield url
    finally:
        stop(proc)
        log.seek(0)
        server_log = log.read()
        log.close()
        print(server_log[-3000:])


def test_help() -> None:
    exe = shutil.which("satml-serve", path=str(Path(sys.executable).parent)) or shutil.which("satml-serve")
    cmd = [exe] if exe else [sys.executable, "-m", "app.serve"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--artifacts-dir" in out.stdout and "SATML_" in out.stdout


@pytest.mark.parametrize("name, value", [("SATML_ATTACK_MAX_EPS", "0.5"), ("SATML_CORS_ORIGINS", "not json")])
def test_invalid_settings_exit_with_a_message(name: str, value: str) -> None:
    env = {**os.environ, name: value}
    out = subprocess.run([sys.executable, "-m", "app.serve"], capture_output=True, text=True, timeout=60, env=env)
    field = name.removeprefix("SATML_").lower()
    assert out.returncode != 0 and field in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("settings, cores, gpu, expected", [
    ({}, 2, False, 2),  # the measured case: a CPU-only host with 2 cores
    ({}, 1, False, 1),
    ({}, 4, False, 1),  # more cores: not measured (each loaded batch would get one thread)
    ({}, 2, True, 1),  # device auto with an NVIDIA driver: one process batches for the card
    ({"device": "cuda"}, 2, False, 1),
    ({"device": "cpu"}, 2, True, 2),  # told to use the CPU: the driver does not matter
    ({"state_dir": "STATE"}, 2, False, 1),  # live bank updates: one bank, one process
])
def test_auto_workers(settings: dict[str, Any], cores: int, gpu: bool, expected: int, tmp_path: Path) -> None:
    from app.config import Settings
    from app.serve import auto_workers

    values: dict[str, Any] = {k: tmp_path if v == "STATE" else v for k, v in settings.items()}
    assert auto_workers(Settings(**values), cores, gpu) == expected


@pytest.mark.slow
def test_default_workers_follow_auto(good_root: Path, tmp_path: Path) -> None:
    """No SATML_WORKERS: satml-serve starts as many processes as `auto_workers` says for this machine (2 on the
    2-core CI machine), and says so in its log."""
    from app.config import Settings
    from app.serve import auto_workers, nvidia_driver_present

    env = serve_env()
    expected = auto_workers(Settings(), os.cpu_count() or 1, nvidia_driver_present())
    port = free_port()
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "app.serve", "--port", str(port), "--artifacts-dir", str(good_root)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(lambda: proc.poll() is None, f"http://127.0.0.1:{port}/health/ready", poll_s=0.2)
        # one process serves in the master itself: no worker processes under it
        assert len(wait_worker_count(proc, expected if expected > 1 else 0)) == (expected if expected > 1 else 0)
    finally:
        stop(proc, 30)
        log.seek(0)
        text = log.read()
        log.close()
    plural = "" if expected == 1 else "es"
    assert f"workers auto: {expected} process{plural} ({os.cpu_count()} cores" in text, text[-3000:]


@pytest.mark.slow
def test_workers_stop_when_their_supervisor_is_killed(good_root: Path, tmp_path: Path) -> None:
    """A SIGKILLed (or crashed) supervisor takes its workers with it (app.serve.exit_with_parent): without that they
    kept serving on their own sockets with nobody to restart or stop them."""
    import signal

    env = serve_env()
    port = free_port()
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "app.serve", "--port", str(port), "--artifacts-dir", str(good_root),
                             "--workers", "2"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    workers: set[str] = set()
    try:
        wait_ready(lambda: proc.poll() is None, f"{url}/health/ready", poll_s=0.2)
        workers = wait_worker_count(proc, 2)
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [w for w in workers if Path(f"/proc/{w}").exists()]
        assert not alive, f"workers outlived their supervisor: {alive}"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health/live", timeout=2)
    finally:
        for w in workers:
            if Path(f"/proc/{w}").exists():
                os.kill(int(w), signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        log.seek(0)
        print(log.read()[-3000:])
        log.close()


def test_per_worker_sockets_share_a_port_that_no_other_server_holds(request: pytest.FixtureRequest) -> None:
    """SATML_REUSE_PORT (workers > 1): sockets made for the workers bind one port together and each listens; a port
    another server already listens on is refused at start with a message (SO_REUSEPORT alone would have joined
    it), and port 0 becomes one port the OS chose, for every worker."""
    import signal
    import socket

    import uvicorn
    from uvicorn.supervisors.multiprocess import SIGNALS

    from app.serve import reuse_port_socket, reuse_port_supervisor

    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}  # the supervisor takes them over: give them back

    def restore() -> None:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    request.addfinalizer(restore)
    config = uvicorn.Config("app.serve:worker_app", factory=True, host="127.0.0.1", port=0, workers=2)
    supervisor = reuse_port_supervisor(config)
    assert config.port != 0
    a, b = supervisor.sockets[0], supervisor.sockets[0]  # one new socket per worker started
    try:
        assert a is not b and a.getsockname()[1] == b.getsockname()[1] == config.port
        a.listen()
        b.listen()
        with socket.create_connection(("127.0.0.1", config.port)):
            pass
    finally:
        a.close()
        b.close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot bind 127.0.0.1:{port}"):
            reuse_port_supervisor(uvicorn.Config("app.serve:worker_app", host="127.0.0.1", port=port, workers=2))
        with pytest.raises(OSError):
            reuse_port_socket("127.0.0.1", port).close()


def test_real_server(server: str) -> None:
    images, labels = toy_images(2, seed=51)
    with httpx.Client(base_url=server, timeout=REQUEST_TIMEOUT_S) as c:
        ready = c.get("/health/ready").json()
        assert set(ready["models"]) == {"default", "other"}
        r = c.post("/classify", files=[("files", (f"{i}.png", png(x), "image/png")) for i, x in enumerate(images)],
                   headers={"X-Request-ID": "uvicorn-1"})
        assert r.status_code == 200 and r.headers["X-Request-ID"] == "uvicorn-1"
        assert [res["class_id"] for res in r.json()["results"]] == labels.tolist()
        r = c.post("/attack", files={"file": ("x.png", png(images[0]), "image/png")},
                   data={"steps": "2", "compare": "other"})
        assert r.status_code == 200 and r.json()["compare"][0]["model"] == "other"
        assert c.post("/attack", files={"file": ("x.png", png(images[0]), "image/png")},
                      data={"steps": "6"}).status_code == 422  # SATML_ATTACK_MAX_STEPS=5 reached the process
        assert "satml_http_requests_total" in c.get("/metrics").text


@pytest.mark.parametrize("name", ["zero_bytes", "truncated_jpeg", "text_as_image", "png_header_20000",
                                  "bomb_past_pillow_limit", "cmyk_jpeg"])
def test_real_server_bad_inputs(server: str, name: str) -> None:
    make, content_type, expected, _ = CORPUS[name]
    with httpx.Client(base_url=server, timeout=REQUEST_TIMEOUT_S) as c:
        r = c.post("/classify", files={"file": (name, make(), content_type)})
        assert r.status_code == expected and r.headers["content-type"].startswith("application/json")
        assert c.get("/health/live").status_code == 200


def test_real_server_huge_body(server: str) -> None:
    body = b"\0" * (3 * 1024 * 1024)
    with httpx.Client(base_url=server, timeout=REQUEST_TIMEOUT_S) as c:
        r = c.post("/classify", files={"file": ("big.png", body, "image/png")})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = c.post("/classify", content=streamed_multipart(3 * 1024 * 1024),  # no Content-Length: counted as streamed
                   headers={"Content-Type": "multipart/form-data; boundary=zz"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    with httpx.Client(base_url=server, timeout=REQUEST_TIMEOUT_S) as c:
        assert c.get("/health/live").status_code == 200


def worker_pids(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> set[str]:
    """uvicorn's worker processes under `proc` (multiprocessing spawns; not its resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"], capture_output=True, text=True)
    return set(out.stdout.split())


def serve_env() -> dict[str, str]:
    """This environment without SATML_* settings and without a metrics folder of another server."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SATML_") and k != "PROMETHEUS_MULTIPROC_DIR"}


def wait_worker_count(proc: subprocess.Popen[bytes], n: int, timeout_s: float = 60) -> set[str]:
    """`proc`'s worker processes once there are `n` of them (or whatever there are after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while len(pids := worker_pids(proc)) != n and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def listening(port: int) -> set[int]:
    """Inodes of the sockets listening on `port` (Linux /proc/net/tcp and tcp6: state 0A, hex local port)."""
    rows = [ln.split() for f in ("tcp", "tcp6") for ln in Path(f"/proc/net/{f}").read_text().splitlines()[1:]]
    return {int(r[9]) for r in rows if r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == port}


def sockets_of(pid: int | str) -> set[int]:
    """Inodes of the sockets process `pid` holds open."""
    links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    return {int(ln[8:-1]) for ln in links if ln.startswith("socket:[")}


def wait_socket_per_worker(port: int, master: int, workers: set[str], timeout_s: float = 30) -> None:
    """Each worker listens on a socket of its own on `port` and the master holds none of them (a listening socket
    nobody accepts on would still take its hash share of new connections). Polled: a worker listens only after
    its lifespan startup (its models loaded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        socks = listening(port)
        owned = [sockets_of(w) & socks for w in workers]
        if len(socks) == len(workers) and all(len(o) == 1 for o in owned) and not sockets_of(master) & socks:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"listening {socks}, per worker {owned}, master {sockets_of(master) & socks}")
        time.sleep(0.1)


def live_gauges(temp: Path, pids: set[str]) -> list[Path]:
    """The live gauge files of `pids` in satml-serve's metrics folder under `temp` (written as a process starts)."""
    return [f for pid in pids for f in temp.glob(f"satml-metrics-*/gauge_live*_{pid}.db")]


def wait_all_loaded(c: httpx.Client, proc: subprocess.Popen[bytes], temp: Path, models: int,
                    timeout_s: float = 90) -> set[str]:
    """Ready answers for whichever process is up first; wait until both worker processes have started (their
    gauge files) and loaded their models (the merged models_loaded is the minimum over them). Their pids."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = worker_pids(proc)
        started = len(pids) == 2 and len(live_gauges(temp, pids)) >= 2 * len(pids)
        if started and f"satml_models_loaded {float(models)}" in c.get("/metrics").text:
            return pids
        time.sleep(0.2)
    raise AssertionError(f"two worker processes with {models} models each not up in {timeout_s} s")


@pytest.mark.slow
def test_several_worker_processes_serve_the_same_answers(good_root: Path, tmp_path: Path) -> None:
    """--workers 2: uvicorn runs two processes, each with its own models (flags reach them through SATML_*) and
    its own listening socket on the port (SO_REUSEPORT), every request is answered alike, /metrics counts the
    requests of both processes, and SIGTERM stops them all (and removes the metrics folder satml-serve made for
    them)."""
    port = free_port()
    temp = tmp_path / "tmp"  # where satml-serve makes its metrics folder
    temp.mkdir()
    env = serve_env()
    env["TMPDIR"] = str(temp)
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "app.serve", "--port", str(port), "--artifacts-dir", str(good_root),
                             "--workers", "2", "--default-model", "other"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(lambda: proc.poll() is None, f"{url}/health/ready", poll_s=0.2)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 2, f"two worker processes (and uvicorn's helpers) under the master: {children}"
        images, _ = toy_images(1, seed=52)
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, headers={"Connection": "close"}) as c:
            pids = wait_all_loaded(c, proc, temp, models=2)
            wait_socket_per_worker(port, proc.pid, pids)  # SATML_REUSE_PORT, the default
            # a connection per request, so that the OS hands requests to both processes
            answers = [c.post("/classify", files=[("files", ("x.png", png(images[0]), "image/png"))]).json()
                       for _ in range(N_REQUESTS)]
            # a request is counted once its answer has gone out: wait for the last one, then scrape again
            deadline = time.monotonic() + 10
            counted = f'satml_http_requests_total{{method="POST",route="/classify",status="200"}} {float(N_REQUESTS)}'
            while counted not in c.get("/metrics").text and time.monotonic() < deadline:
                time.sleep(0.1)
            scrapes = [c.get("/metrics").text for _ in range(4)]
        assert all(a["model"] == "other" for a in answers), "--default-model reached every worker"
        assert len({str(a["results"]) for a in answers}) == 1
        assert len(list(temp.glob("satml-metrics-*"))) == 1
        seen = [[ln for ln in t.splitlines() if ln.startswith(("satml_images_classified_total", "satml_models_loaded",
                                                                "satml_http_requests_total"))] for t in scrapes]
        for text in scrapes:  # whichever process answers the scrape counts every process's requests
            assert f'satml_images_classified_total{{model="other"}} {float(N_REQUESTS)}' in text, seen
            assert counted in text, seen
            assert "satml_models_loaded 2.0" in text, seen  # in each process (livemin), not summed
    finally:
        stop(proc, 30)
        log.seek(0)
        print(log.read()[-6000:])
        log.close()
    assert subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True).returncode != 0, "no orphan workers"
    assert list(temp.glob("satml-metrics-*")) == [], "the metrics folder is removed at exit"


SITECUSTOMIZE = """
import os
if os.environ.get("FAULT_DIE_FLAG"):  # a one-shot fault: the next k-NN call of any model raises SystemExit
    import torch  # noqa: F401  (before faiss)
    import app.predictor as predictor
    real = predictor.build_index

    def build(kind, art, spec=None):
        index = real(kind, art, spec)

        def predict(z):
            try:
                os.remove(os.environ["FAULT_DIE_FLAG"])
            except FileNotFoundError:
                return index(z)
            raise SystemExit("injected worker death")
        return predict

    predictor.build_index = build
    predictor.Predictor.fuses = lambda self: False  # the vote in the torch index, where the fault is
"""


@pytest.mark.slow
def test_a_process_whose_worker_died_is_replaced(good_root: Path, tmp_path: Path) -> None:
    """--workers 2: a batch worker that dies ends its process (app.main.end_this_process) and uvicorn starts a new
    one; afterwards every request and readiness probe is answered. The fault comes in through a sitecustomize on
    PYTHONPATH (the worker processes are fresh interpreters: monkeypatching this one cannot reach them)."""
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    flag = tmp_path / "die"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATML_")}
    temp = tmp_path / "tmp"  # where satml-serve makes its metrics folder
    temp.mkdir()
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path / "fault"), str(Path(__file__).resolve().parents[2])]),
               FAULT_DIE_FLAG=str(flag), SATML_LOOP_BATCHING="off", TMPDIR=str(temp))  # /classify via the worker
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "app.serve", "--port", str(port), "--artifacts-dir", str(good_root),
                             "--workers", "2"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    image = png(toy_images(1, seed=53)[0][0])

    try:
        wait_ready(lambda: proc.poll() is None, f"{url}/health/ready", poll_s=0.2)
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, headers={"Connection": "close"}) as c:
            # both up first: a process still starting would take the one-shot fault in its warm-up and fail to start
            before = wait_all_loaded(c, proc, temp, models=2)
            flag.touch()
            assert c.post("/classify", files={"file": ("x.png", image, "image/png")}).status_code == 503
            assert not flag.exists()
            # until the dead worker's process is replaced and its successor has loaded its models (the other is
            # kept, unless uvicorn's own health ping timed out on a loaded machine and replaced it too)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                now = worker_pids(proc)
                if len(now) == 2 and now != before and len(live_gauges(temp, now)) >= 2 * len(now):
                    break
                time.sleep(0.2)
            assert len(now) == 2 and now != before, (before, now)
            wait_socket_per_worker(port, proc.pid, now)  # the dead process's socket closed with it
            gone = before - now  # their live gauges (queue depth, health) left the merged /metrics as they ended
            assert not live_gauges(temp, gone) and len(live_gauges(temp, now)) >= 2 * len(now), sorted(
                str(p.relative_to(temp)) for p in temp.rglob("*"))
            wait_ready(lambda: proc.poll() is None, f"{url}/health/ready", poll_s=0.2)
            codes = [c.post("/classify", files={"file": ("x.png", image, "image/png")}).status_code
                     for _ in range(8)] + [c.get("/health/ready").status_code for _ in range(6)]
        assert codes == [200] * 14
        assert proc.poll() is None, "the server itself is still up"
    finally:
        stop(proc, 30)
        log.seek(0)
        server_log = log.read()
        log.close()
        print(server_log[-4000:])
    assert "ending this server process" in server_log
