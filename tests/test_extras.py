"""The dependency split (issue 12): a server install needs no training-only package, training needs no web stack."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TRAIN_ONLY = {"onnxscript", "matplotlib", "sklearn"}  # onnx is the cpu / gpu extras' too (app.fused), loaded lazily
SERVE_ONLY = {"fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "prometheus_client", "multipart"}


def _top_level_modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json\n"
                          "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("[")[0].split("<")[0].strip() for r in requirements}


@pytest.mark.slow
def test_the_server_imports_no_training_only_package() -> None:
    loaded = _top_level_modules_after("import app.main, app.serve; app.main.create_app()")
    assert not loaded & TRAIN_ONLY, loaded & TRAIN_ONLY


@pytest.mark.slow
def test_training_imports_no_web_stack() -> None:
    loaded = _top_level_modules_after("import training.cli, training.train, training.export, training.robustness")
    assert not loaded & SERVE_ONLY, loaded & SERVE_ONLY


def test_extras_hold_what_each_side_needs() -> None:
    core, extras = _names(PROJECT["dependencies"]), {k: _names(v) for k, v in PROJECT["optional-dependencies"].items()}
    assert {"fastapi", "uvicorn", "pydantic-settings"} <= extras["serve"]
    # uvloop + httptools (uvicorn picks them when installed): what benchmarks/serve_bench.py measured
    assert any(r.startswith("uvicorn[standard]") for r in PROJECT["optional-dependencies"]["serve"])
    assert {"onnx", "onnxscript", "matplotlib"} <= extras["train"]
    assert {"onnxruntime", "onnx"} <= extras["cpu"] and {"onnxruntime-gpu", "onnx"} <= extras["gpu"]  # app.fused
    assert any(r.startswith("ray[serve]") for r in PROJECT["optional-dependencies"]["ray"])  # satml-ray-serve
    assert not core & (extras["serve"] | extras["train"]), "a split package must not stay in the core list"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "['optional-dependencies']['serve']" in dockerfile, "the image installs the serve extra"
    makefile = (ROOT / "Makefile").read_text()
    assert '".[$(EXTRA),serve]"' in makefile and '".[$(EXTRA),serve,train,ray,dev]"' in makefile  # dev: Ray Serve tests


@pytest.mark.slow
def test_the_settings_and_the_launcher_import_no_torch() -> None:
    """`satml-serve --workers N`: the master process only parses settings and runs uvicorn's supervisor."""
    loaded = _top_level_modules_after("import app.config, app.serve; app.config.Settings()")
    assert "torch" not in loaded and "training" not in loaded
