"""Fixtures: tiny toy artifacts exported once per session, apps built over them per test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.app.toy import corrupt_sha, export_toy, set_format_version


@pytest.fixture(autouse=True)
def _no_satml_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read SATML_* variables; the developer's shell must not steer the tests."""
    for field in Settings.model_fields:
        monkeypatch.delenv(f"SATML_{field.upper()}", raising=False)


@pytest.fixture(scope="session")
def good_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """artifacts/ with two good models: `default` (toy SAT) and `other` (toy supervised)."""
    root = tmp_path_factory.mktemp("artifacts_good")
    export_toy(root / "default", 0, name="toy-sat", method="sat")
    export_toy(root / "other", 1, name="toy-supervised", method="supervised")
    return root


@pytest.fixture(scope="session")
def mixed_root(good_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The good models plus two that must be refused: a sha256 mismatch and an unknown format version."""
    root = tmp_path_factory.mktemp("artifacts_mixed")
    for name in ("default", "other"):
        shutil.copytree(good_root / name, root / name)
    shutil.copytree(good_root / "default", root / "bad_sha")
    corrupt_sha(root / "bad_sha")
    shutil.copytree(good_root / "default", root / "bad_version")
    set_format_version(root / "bad_version", 99)
    (root / "not_an_artifact").mkdir()
    return root


def make_settings(root: Path, **kw: Any) -> Settings:
    return Settings(artifacts_dir=root, max_wait_ms=kw.pop("max_wait_ms", 2), **kw)


@pytest.fixture
def client(mixed_root: Path) -> Iterator[TestClient]:
    """A running app (lifespan entered) over good and bad artifacts."""
    with TestClient(create_app(make_settings(mixed_root)), raise_server_exceptions=False) as c:
        yield c
