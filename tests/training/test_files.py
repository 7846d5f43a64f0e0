"""training.files: a file set aside keeps its content under a new name, and a second one never overwrites it."""
from __future__ import annotations

from pathlib import Path

from training.files import set_aside


def test_set_aside_never_overwrites_within_one_second(tmp_path: Path) -> None:
    p = tmp_path / "overlay.json"
    moved = []
    for i in range(3):  # three set-asides within one second share the UTC stamp
        p.write_text(f"v{i}")
        moved.append(set_aside(p, "refused"))
    assert not p.exists()
    assert [m.read_text() for m in moved] == ["v0", "v1", "v2"]
    assert len({m.name for m in moved}) == 3
    assert all(m.name.startswith("overlay.json.refused-") and m.parent == tmp_path for m in moved)
