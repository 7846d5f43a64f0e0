"""Per-attack results on disk, keyed by the full protocol, so an interrupted suite resumes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger("training.robustness")

CACHE_VERSION = 1  # bump when an attack's implementation changes so cached results are not reused


class Cache:
    """Per-model JSON results and tensors under `<out>/cache/<model sha[:16]>/`, keyed by the full protocol."""

    def __init__(self, root: Path, enabled: bool) -> None:
        self.root, self.enabled = root, enabled

    def _path(self, sha: str, name: str, key: dict[str, Any], suffix: str) -> Path:
        digest = hashlib.sha256(json.dumps({**key, "v": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / sha[:16] / f"{name}-{digest}{suffix}"

    def get(self, sha: str, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        p = self._path(sha, name, key, ".json")
        if self.enabled and p.is_file():
            try:
                stored = json.loads(p.read_text())
            except json.JSONDecodeError:
                log.warning("ignoring unreadable cache file %s", p)
                return None
            if stored.pop("key", None) != json.loads(json.dumps(key)):  # a digest collision, or a hand-edited file
                log.warning("ignoring cache file %s: its protocol key differs", p)
                return None
            return dict(stored)
        return None

    def put(self, sha: str, name: str, key: dict[str, Any], value: dict[str, Any]) -> None:
        p = self._path(sha, name, key, ".json")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, **value}))
        os.replace(tmp, p)

    def get_tensor(self, sha: str, name: str, key: dict[str, Any]) -> Tensor | None:
        p = self._path(sha, name, key, ".safetensors")
        return load_file(p)["x"] if self.enabled and p.is_file() else None

    def put_tensor(self, sha: str, name: str, key: dict[str, Any], x: Tensor) -> None:
        p = self._path(sha, name, key, ".safetensors")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        save_file({"x": x.contiguous()}, tmp)
        os.replace(tmp, p)


def to_bits(mask: np.ndarray) -> str:
    return "".join("1" if b else "0" for b in mask)


def from_bits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8) == ord("1")
