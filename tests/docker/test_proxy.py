"""The replicas profile's reverse proxy (issue 16): the shipped docker/nginx/satml.conf, run by Debian's nginx
in front of two real `satml-serve` replicas on 127.0.0.1, balances /classify over both and keeps answering when
one replica is killed mid-traffic (the dropped request is retried on the other)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.servers import free_port, stop, wait_ready
from tests.app.toy import export_toy, png, toy_images
from tests.docker.dockertools import REPO

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NGINX is None, reason="nginx not installed (apt-get install nginx; .ci/run does)")]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[subprocess.Popen[bytes], int]]]:
    root = tmp_path_factory.mktemp("artifacts")
    export_toy(root / "default", 0, name="toy-sat")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATML_")}
    env["SATML_WORKERS"] = "1"  # a replica is one process: SIGKILL below takes the whole replica down
    procs = []
    try:
        for i in range(2):
            port = free_port()
            log = (tmp_path_factory.mktemp(f"replica{i}") / "server.log").open("w+")
            proc = subprocess.Popen([sys.executable, "-m", "app.serve", "--port", str(port), "--host", "127.0.0.1",
                                     "--artifacts-dir", str(root)], env=env, stdout=log, stderr=subprocess.STDOUT)
            procs.append((proc, port))
        for proc, port in procs:
            wait_ready(lambda p=proc: p.poll() is None, f"http://127.0.0.1:{port}/health/ready", poll_s=0.2)
        yield procs
    finally:
        for proc, _ in procs:
            stop(proc)


@pytest.fixture(scope="module")
def proxy(replicas: list[tuple[subprocess.Popen[bytes], int]],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """nginx with the shipped server block (its listen port moved to a free one) and a loopback upstream."""
    d = tmp_path_factory.mktemp("nginx")
    port = free_port()
    shipped = (REPO / "docker" / "nginx" / "satml.conf").read_text()
    assert "listen 8080;" in shipped
    (d / "satml.conf").write_text(shipped.replace("listen 8080;", f"listen 127.0.0.1:{port};"))
    servers = "\n".join(f"    server 127.0.0.1:{p} max_fails=2 fail_timeout=10s;" for _, p in replicas)
    temp = "\n".join(f"  {k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""
    (d / "nginx.conf").write_text(f"""{user}worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  log_format upstream '$request_uri $status $upstream_addr $upstream_status';
  access_log {d}/access.log upstream;
{temp}
  upstream satml {{
{servers}
    keepalive 8;
  }}
  include {d}/satml.conf;
}}
""")
    check = subprocess.run([NGINX, "-t", "-p", str(d), "-c", str(d / "nginx.conf")], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(lambda: proc.poll() is None, f"{url}/health/ready", timeout_s=30)
        yield url, d / "access.log"
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _classify(client: httpx.Client, url: str, image: bytes) -> httpx.Response:
    return client.post(f"{url}/classify", files={"files": ("x.png", image, "image/png")}, timeout=30)


def _log_lines(log: Path, start: int, want: int) -> list[list[str]]:
    """The /classify lines of nginx's access log after line `start`, once `want` of them are there (nginx writes
    a line after its response has gone out); fewer after 5 s."""
    lines: list[list[str]] = []
    for _ in range(100):
        lines = [line.split() for line in log.read_text().splitlines()[start:] if line.startswith("/classify")]
        if len(lines) >= want:
            break
        time.sleep(0.05)
    return lines


def test_proxy_balances_and_survives_a_killed_replica(replicas: list[tuple[subprocess.Popen[bytes], int]],
                                                      proxy: tuple[str, Path]) -> None:
    url, log = proxy
    images, _ = toy_images(2, seed=5)
    image = png(images[0])
    with httpx.Client() as client:
        direct = _classify(client, f"http://127.0.0.1:{replicas[0][1]}", image).json()["results"]
        answers = [_classify(client, url, image) for _ in range(12)]
        assert all(r.status_code == 200 for r in answers), [r.status_code for r in answers]
        assert all(r.json()["results"] == direct for r in answers), "every replica serves the same answer"
        served = {line[2] for line in _log_lines(log, 0, 12)}
        assert served == {f"127.0.0.1:{p}" for _, p in replicas}, f"both replicas take traffic: {served}"

        seen = len(log.read_text().splitlines())
        killed, killed_port = replicas[0]
        dead = f"127.0.0.1:{killed_port}"
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        after = [_classify(client, url, image) for _ in range(12)]
    assert all(r.status_code == 200 for r in after), [r.status_code for r in after]
    lines = _log_lines(log, seen, 12)
    assert len(lines) == 12
    survivor = f"127.0.0.1:{replicas[1][1]}"
    # every request ended on the survivor; those first sent to the dead replica were retried (addr "dead, live")
    assert all(line[-2].endswith(survivor) or survivor in " ".join(line[2:]) for line in lines), lines
    assert any(dead in " ".join(line[2:]) for line in lines), "the killed replica was tried, then skipped"
