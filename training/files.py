"""Setting a file aside under a new name without ever overwriting an earlier one set aside the same way."""
from __future__ import annotations

import time
from pathlib import Path


def set_aside(path: Path, tag: str) -> Path:
    """Rename `path` to `<name>.<tag>-<UTC time>`, adding `-1`, `-2`, ... while that name is taken, so two set-asides
    within one second (two refused overlays, two fresh training starts) both keep their file. Returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = path.with_name(f"{path.name}.{tag}-{stamp}"), 1
    while dest.exists():
        dest, n = path.with_name(f"{path.name}.{tag}-{stamp}-{n}"), n + 1
    path.rename(dest)
    return dest
