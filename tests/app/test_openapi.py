"""Property-based tests generated from the OpenAPI schema (schemathesis): no 500s, every response
matches the documented status codes, content types and schemas. Hooks steer part of the generated
requests to valid images and model names, so the 200 paths are explored as well as the errors."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.toy import export_toy, png

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis not installed (pip install -e '.[dev]')")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MODELS = ["default", "other"]


def _root() -> Path:
    """Toy artifacts for this module (schemathesis needs the app when the module is collected)."""
    root = Path(tempfile.mkdtemp(prefix="satml_schema_"))
    export_toy(root / "default", 0, name="toy-sat", onnx=False)
    export_toy(root / "other", 1, name="toy-supervised", method="supervised", onnx=False)
    return root


APP = create_app(make_settings(_root(), attack_max_steps=10, certify_max_n=200, certify_max_n0=20, max_wait_ms=0))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
images = st.builds(lambda rgb, size: png(np.full((size, size, 3), rgb, np.uint8)),
                   st.tuples(*[st.integers(0, 255)] * 3), st.integers(1, 48))


@schema.hook
def flatmap_body(context: Any, body: Any) -> st.SearchStrategy:
    """Half of the multipart bodies get a real image and a real model name."""
    if not isinstance(body, dict):
        return st.just(body)

    def steer(valid: bool, image: bytes, model: str) -> dict:
        if not valid:
            return body
        out = {**body, "model": model}
        for field in ("file", "files"):
            if field in out:
                out[field] = [image] if field == "files" else image
        if "file" not in out and "files" not in out:
            out["file"] = image
        return out

    return st.builds(steer, st.booleans(), images, st.sampled_from(MODELS))


@schema.hook
def map_path_parameters(context: Any, params: dict[str, Any] | None) -> dict[str, Any] | None:
    """Half of the generated model and file names are real ones."""
    if not params:
        return params
    if "name" in params and len(params["name"]) % 2 == 0:
        params = {**params, "name": MODELS[len(params["name"]) % 4 // 2]}
    if "filename" in params and len(params["filename"]) % 2 == 0:
        params = {**params, "filename": "card.md"}
    return params


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)
