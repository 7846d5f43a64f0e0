"""scripts/candidate_state.sh: what a candidate's unfinished chain carries to the next machine, by where it stands,
and a restore that puts it back where the chain looks without overwriting what a surviving machine has."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATE = ROOT / "scripts" / "candidate_state.sh"


def run(cwd: Path, *args: str, max_kb: int = 2048) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(STATE), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "MAX_KB": str(max_kb)})


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def training(tmp_path: Path) -> Path:
    """A run mid-training: its checkpoint, config, metrics (not final) and cluster record; nothing exported."""
    r = tmp_path / "runs/rx/robust"
    write(r / "checkpoint.pt", b"weights at step 100")
    write(r / "config.json", "{}")
    write(r / "metrics.jsonl", '{"step": 100}\n')
    write(r / "pseudo_labels.npy", b"ids")
    write(r / "scratch.tmp", "not carried")
    return tmp_path


def test_mid_training_carries_the_checkpoint_and_the_cluster_record(training: Path) -> None:
    write(training / "runs/val1000_cache/other/pgd20.json", "{}")  # an earlier candidate's gate: not this one's yet
    out = run(training, "save", "runs/rx", "state")
    assert out.returncode == 0, out.stderr
    assert files(training / "state") == {"robust/checkpoint.pt", "robust/config.json", "robust/metrics.jsonl",
                                         "robust/pseudo_labels.npy"}
    fresh = training / "fresh"
    fresh.mkdir()
    out = run(fresh, "restore", str(training / "state"), "runs/rx")
    assert out.returncode == 0, out.stderr
    assert (fresh / "runs/rx/robust/checkpoint.pt").read_bytes() == b"weights at step 100"
    assert (fresh / "runs/rx/robust/pseudo_labels.npy").read_bytes() == b"ids"


def test_mid_gate_carries_the_checkpoint_the_artifact_and_the_gate_cache(training: Path) -> None:
    write(training / "runs/rx/robust/metrics.jsonl", '{"step": 7000, "final": true}\n')
    write(training / "runs/rx/art/default/manifest.json", "{}")
    write(training / "runs/rx/art/default/encoder.onnx", b"onnx")
    write(training / "runs/val1000_cache/abc/pgd20.json", "{}")
    out = run(training, "save", "runs/rx", "state")
    assert out.returncode == 0, out.stderr
    # the gate re-exports from the checkpoint when it reruns, so the checkpoint still travels
    assert {"robust/checkpoint.pt", "art/default/manifest.json", "art/default/encoder.onnx",
            "val1000_cache/abc/pgd20.json"} <= files(training / "state")
    fresh = training / "fresh"
    fresh.mkdir()
    assert run(fresh, "restore", str(training / "state"), "runs/rx").returncode == 0
    assert (fresh / "runs/val1000_cache/abc/pgd20.json").exists()
    assert (fresh / "runs/rx/art/default/encoder.onnx").read_bytes() == b"onnx"


def test_mid_suite_carries_the_artifact_gate_and_suite_cache_not_the_checkpoint(training: Path) -> None:
    write(training / "runs/rx/robust/metrics.jsonl", '{"step": 7000, "final": true}\n')
    write(training / "runs/rx/art/default/manifest.json", "{}")
    write(training / "runs/rx/val_gate/robustness.json", '{"models": []}')
    write(training / "runs/val1000_cache/abc/pgd20.json", "{}")
    write(training / "runs/rx/suite/cache/abc/apgd-ce.json", "{}")
    write(training / "runs/rx/suite/cache/sup/transfer.pt", b"x" * 3 * 1024)  # over the limit below: left out
    out = run(training, "save", "runs/rx", "state", max_kb=2)
    assert out.returncode == 0, out.stderr
    assert "left out runs/rx/suite/cache/sup/transfer.pt" in out.stderr
    assert files(training / "state") == {
        "robust/config.json", "robust/metrics.jsonl", "robust/pseudo_labels.npy", "art/default/manifest.json",
        "val_gate/robustness.json", "suite_cache/abc/apgd-ce.json"}
    fresh = training / "fresh"
    fresh.mkdir()
    assert run(fresh, "restore", str(training / "state"), "runs/rx").returncode == 0
    assert (fresh / "runs/rx/suite/cache/abc/apgd-ce.json").exists()
    assert (fresh / "runs/rx/val_gate/robustness.json").exists()
    assert not (fresh / "runs/rx/robust/checkpoint.pt").exists()


def test_restore_keeps_what_a_surviving_machine_has(training: Path) -> None:
    assert run(training, "save", "runs/rx", "state").returncode == 0
    write(training / "runs/rx/robust/checkpoint.pt", b"weights at step 200")  # trained on since the save
    assert run(training, "restore", "state", "runs/rx").returncode == 0
    assert (training / "runs/rx/robust/checkpoint.pt").read_bytes() == b"weights at step 200"


def test_a_second_save_replaces_the_first(training: Path) -> None:
    write(training / "runs/rx/art/default/manifest.json", "{}")
    assert run(training, "save", "runs/rx", "state").returncode == 0
    (training / "runs/rx/art/default/manifest.json").unlink()
    assert run(training, "save", "runs/rx", "state").returncode == 0
    assert not (training / "state/art").exists()


@pytest.mark.parametrize("args", [("save", "runs/none", "state"), ("restore", "nowhere", "runs/rx"),
                                  ("keep", "a", "b"), ("save", "runs/rx")])
def test_refuses_what_it_cannot_do(training: Path, args: tuple[str, ...]) -> None:
    out = run(training, *args)
    assert out.returncode in (1, 2)
    assert "candidate_state" in out.stderr or "usage" in out.stderr


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}).stdout.strip()


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, str]:
    """A repository whose earlier commit held a candidate's state that a later commit removed."""
    git(tmp_path, "init", "-q")
    write(tmp_path / "checkpoints/r1/state/robust/checkpoint.pt", b"r1 weights")
    write(tmp_path / "checkpoints/r1/state/robust/sub/config.json", "{}")
    write(tmp_path / "checkpoints/r1/other.txt", "not under the path")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "r1")
    rev = git(tmp_path, "rev-parse", "HEAD")
    git(tmp_path, "rm", "-rq", "checkpoints/r1/state")
    git(tmp_path, "commit", "-qm", "r1 leaves main")
    return tmp_path, rev


def test_from_git_copies_a_removed_state_byte_for_byte(history: tuple[Path, str]) -> None:
    repo, rev = history
    out = run(repo, "from-git", rev[:7], "checkpoints/r1/state/robust/", "runs/r2/init")
    assert out.returncode == 0, out.stderr
    assert files(repo / "runs/r2/init") == {"checkpoint.pt", "sub/config.json"}
    assert (repo / "runs/r2/init/checkpoint.pt").read_bytes() == b"r1 weights"


def test_from_git_keeps_a_file_that_is_there(history: tuple[Path, str]) -> None:
    repo, rev = history
    write(repo / "runs/r2/init/checkpoint.pt", b"already here")
    assert run(repo, "from-git", rev, "checkpoints/r1/state/robust", "runs/r2/init").returncode == 0
    assert (repo / "runs/r2/init/checkpoint.pt").read_bytes() == b"already here"
    assert (repo / "runs/r2/init/sub/config.json").read_text() == "{}"
    assert not list((repo / "runs/r2/init").rglob("*.part"))


@pytest.mark.parametrize(("rev", "path", "message"), [
    ("0" * 40, "checkpoints/r1/state", "is not a commit"),
    (None, "checkpoints/r9/state", "has no files under checkpoints/r9/state"),
])
def test_from_git_refuses_what_the_history_does_not_hold(history: tuple[Path, str], rev: str | None, path: str,
                                                         message: str) -> None:
    repo, good = history
    out = run(repo, "from-git", rev or good, path, "runs/r2/init")
    assert out.returncode == 1
    assert message in out.stderr
    assert not (repo / "runs/r2").exists()


def test_from_git_needs_all_three_arguments(history: tuple[Path, str]) -> None:
    repo, rev = history
    out = run(repo, "from-git", rev, "checkpoints/r1/state")
    assert out.returncode == 2
    assert "from-git REV PATH DEST" in out.stderr


def test_a_stopped_gate_travels_as_a_finished_one(training: Path) -> None:
    """A fail-fast gate that stopped (stopped.json, no report) is finished: its record travels, the checkpoint not."""
    write(training / "runs/rx/robust/metrics.jsonl", '{"step": 7000, "final": true}\n')
    write(training / "runs/rx/art/default/manifest.json", "{}")
    write(training / "runs/rx/val_gate/stopped.json", '{"after": "clean"}')
    write(training / "runs/val1000_cache/abc/pgd20.json", "{}")
    out = run(training, "save", "runs/rx", "state")
    assert out.returncode == 0, out.stderr
    saved = files(training / "state")
    assert "val_gate/stopped.json" in saved and "robust/checkpoint.pt" not in saved
    assert not any(f.startswith("val1000_cache/") for f in saved)
