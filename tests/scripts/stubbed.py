"""Run one of scripts/ with the commands it calls replaced by stubs that log their arguments (each of those commands
is tested on its own): what a script test then checks is which commands it runs, with which arguments."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOGGER = '#!/usr/bin/env bash\necho "$(basename "$0") $*" >> "$LOG"\n'


def run_stubbed(tmp_path: Path, script: str, stubs: tuple[str, ...], *args: str,
                **env: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Copy scripts/SCRIPT into tmp_path/scripts, write each stub (a scripts/ name, or `satml` onto PATH), run the
    script there with ARGS and ENV; -> (the process, the stubs' log)."""
    scripts, bin_ = tmp_path / "scripts", tmp_path / "bin"
    scripts.mkdir(exist_ok=True)
    bin_.mkdir(exist_ok=True)
    shutil.copy(ROOT / "scripts" / script, scripts)
    for name in stubs:
        stub = (scripts if name.endswith(".sh") else bin_) / name
        stub.write_text(LOGGER)
        stub.chmod(0o755)
    log = tmp_path / "log"
    log.write_text("")
    out = subprocess.run(["bash", f"scripts/{script}", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={"PATH": f"{bin_}:/usr/bin:/bin", "LOG": str(log), **env})
    return out, log.read_text()
