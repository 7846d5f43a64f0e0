"""benchmarks/serve_ab.py: variant and point parsing, and the side-by-side summary."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_script

serve_ab = load_script("serve_ab")


def test_variants_parse_settings_and_revisions() -> None:
    assert serve_ab.parse_variant("on:") == serve_ab.Variant("on", {}, None)
    assert serve_ab.parse_variant("old@HEAD~1:SATML_A=1,SATML_B=x=y") == serve_ab.Variant(
        "old", {"SATML_A": "1", "SATML_B": "x=y"}, "HEAD~1")
    for bad in ("noColon", ":SATML_A=1", "a:A=1", "a:SATML_A"):
        with pytest.raises(argparse.ArgumentTypeError):
            serve_ab.parse_variant(bad)


def test_points_parse() -> None:
    assert serve_ab.parse_point("8x32") == (8, 32) and serve_ab.parse_point("1X1") == (1, 1)
    for bad in ("8", "0x32", "ax1", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError):
            serve_ab.parse_point(bad)


def test_summary_medians_and_ratios_to_the_first_variant() -> None:
    def run(variant: str, ips: float, p99: float) -> dict[str, object]:
        return {"point": "1x32", "variant": variant, "images_per_s": ips, "p50_ms": p99 / 2, "p99_ms": p99,
                "errors": 0}

    result = {"variants": [{"name": "a"}, {"name": "b"}], "points": ["1x32"],
              "runs": [run("a", 100, 10), run("b", 130, 8), run("a", 110, 12), run("b", 120, 9), run("a", 90, 30),
                       run("b", 150, 7)]}
    rows = serve_ab.summarise(result)
    assert [(r["variant"], r["median"], r["p99_median"]) for r in rows] == [("a", 100, 12), ("b", 130, 8)]
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] == pytest.approx(1.3)


def test_markdown_shows_no_ratio_when_the_first_variant_answered_nothing() -> None:
    def run(variant: str, ips: float) -> dict[str, object]:
        return {"point": "1x32", "variant": variant, "images_per_s": ips, "p50_ms": 1.0, "p99_ms": 2.0,
                "errors": 0 if ips else 40}

    result = {"variants": [{"name": "a", "env": {}, "rev": None}, {"name": "b", "env": {}, "rev": None}],
              "points": ["1x32"], "runs": [run("a", 0), run("b", 120)], "started": "now",
              "artifacts": "x", "model": "default",
              "machine": {"cpu": "c", "cores": 2, "torch": "t", "loadavg_at_start": [0], "loadavg_at_end": [0]},
              "rounds": 1, "duration_s": 1.0}
    result["summary"] = rows = serve_ab.summarise(result)
    assert rows[1]["ratio"] is None
    text = serve_ab.markdown(result, "cmd")
    assert "| 1x32 | b | 120 | 120 | - |" in text
    assert "Artifact `x/default`" in text
    result["variants"][1]["env"] = {"SATML_ARTIFACTS_DIR": "/tmp/b"}  # a variant with its own models folder
    assert "from each variant's `SATML_ARTIFACTS_DIR` (else `x`)" in serve_ab.markdown(result, "cmd")


def test_paired_ratios_compare_each_round_with_the_first_variants_same_round() -> None:
    """A drift between rounds (round 1 all twice as fast) cancels in the paired ratios, not in the medians'."""
    def run(variant: str, r: int, ips: float) -> dict[str, object]:
        return {"round": r, "point": "1x32", "variant": variant, "images_per_s": ips, "p50_ms": 1.0,
                "p99_ms": 2.0, "errors": 0}

    result = {"variants": [{"name": "a", "env": {}, "rev": None}, {"name": "b", "env": {}, "rev": None}],
              "points": ["1x32"], "runs": [run("a", 0, 100), run("b", 0, 110), run("b", 1, 220), run("a", 1, 200),
                                           run("a", 2, 100), run("b", 2, 110)], "started": "now", "artifacts": "x",
              "model": "default", "paired": True, "rounds": 3, "duration_s": 1.0,
              "machine": {"cpu": "c", "cores": 2, "torch": "t", "loadavg_at_start": [0], "loadavg_at_end": [0]}}
    result["summary"] = rows = serve_ab.summarise(result)
    assert rows[0]["paired_ratios"] == [1.0, 1.0, 1.0]
    assert rows[1]["paired_ratios"] == pytest.approx([1.1, 1.1, 1.1]) and rows[1]["paired_median"] == pytest.approx(1.1)
    text = serve_ab.markdown(result, "cmd")
    assert "| 1x32 | b | 110, 220, 110 | 110 | 1.10 | 1.10, 1.10, 1.10 (1.10) |" in text
    assert "order rotated each round (--paired)" in text


def test_runs_without_rounds_have_no_paired_ratios() -> None:
    result = {"variants": [{"name": "a"}], "points": ["1x1"],
              "runs": [{"point": "1x1", "variant": "a", "images_per_s": 5.0, "p50_ms": 1.0, "p99_ms": 1.0,
                        "errors": 0}]}
    (row,) = serve_ab.summarise(result)
    assert row["paired_ratios"] == [] and row["paired_median"] is None


def test_paired_rounds_warm_each_variant_at_the_point_it_is_about_to_measure(monkeypatch: pytest.MonkeyPatch,
                                                                               tmp_path: Path) -> None:
    """--paired: before every timed run an untimed run of the same server, body and connections (--warmup s);
    --warmup 0 runs none. wrk and the servers are recorders here: this checks the order, not a server."""
    import contextlib

    calls: list[tuple[str, str, int, float]] = []

    @contextlib.contextmanager
    def fake_server(args: object, v: object, root: object, bodies: object, tmp: object) -> Iterator[tuple[str, int]]:
        yield f"http://{v.name}", 1  # type: ignore[attr-defined]

    def fake_wrk(url: str, body: Path, conns: int, duration: float, pid: int | None = None) -> dict[str, object]:
        calls.append((url.split("/")[2], body.name, conns, duration))
        return {"rps": 1.0, "p50_ms": 1.0, "p99_ms": 1.0, "errors": 0}

    monkeypatch.setattr(serve_ab, "variant_server", fake_server)
    monkeypatch.setattr(serve_ab, "run_wrk", fake_wrk)
    a, b = serve_ab.Variant("a", {}), serve_ab.Variant("b", {})
    bodies = {1: tmp_path / "b1", 8: tmp_path / "b8"}
    args = argparse.Namespace(rounds=2, points=[(1, 1), (8, 32)], duration=3.0, warmup=1.0)
    result: dict[str, object] = {"runs": []}
    serve_ab.paired_rounds(args, [a, b], {"a": tmp_path, "b": tmp_path}, bodies, tmp_path, result)
    assert calls[:4] == [("a", "b1", 1, 1.0), ("a", "b1", 1, 3.0), ("b", "b1", 1, 1.0), ("b", "b1", 1, 3.0)]
    assert calls[8:10] == [("b", "b1", 1, 1.0), ("b", "b1", 1, 3.0)]  # round 2 starts with b (rotated)
    assert [c[3] for c in calls] == [1.0, 3.0] * 8
    calls.clear()
    serve_ab.paired_rounds(argparse.Namespace(**{**vars(args), "warmup": 0.0}), [a, b], {"a": tmp_path, "b": tmp_path},
                           bodies, tmp_path, {"runs": []})
    assert [c[3] for c in calls] == [3.0] * 8
