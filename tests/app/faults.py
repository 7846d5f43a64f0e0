"""Fault injection for tests: a k-NN index that hangs or kills its batch worker on demand."""

from __future__ import annotations

import threading
import time

import pytest

import app.predictor


def inject_index_fault(monkeypatch: pytest.MonkeyPatch, hang: threading.Event, die: threading.Event | None = None,
                       stuck_s: float = 10.0) -> None:
    """Models built from now on get the real k-NN index, which first blocks while `hang` is set (for at most
    `stuck_s`, so a failing test still ends) and raises SystemExit (the worker thread dies) once `die` is set."""
    real = app.predictor.build_index

    def build(kind, art, spec=None):
        index = real(kind, art, spec)

        def predict(z):
            if die is not None and die.is_set():
                raise SystemExit("injected worker death")
            deadline = time.monotonic() + stuck_s
            while hang.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            return index(z)
        return predict

    monkeypatch.setattr(app.predictor, "build_index", build)
    # the fault lives in the torch index: keep the vote there (not in the onnxruntime graph, app.fused)
    monkeypatch.setattr(app.predictor.Predictor, "fuses", lambda self: False)
