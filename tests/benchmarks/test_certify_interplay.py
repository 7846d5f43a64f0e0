"""benchmarks/certify_interplay.py: its variants (serve_ab's syntax, no revisions) and argument checks."""

from __future__ import annotations

import argparse

import pytest

from tests.benchmarks.conftest import load_script

interplay = load_script("certify_interplay")


def test_variants_are_settings_of_this_tree_only() -> None:
    assert interplay.parse_variant("c32:SATML_CERTIFY_CHUNK=32") == ("c32", {"SATML_CERTIFY_CHUNK": "32"})
    assert interplay.parse_variant("plain:") == ("plain", {})
    for bad in ("noColon", "a:CERTIFY_CHUNK=3", "old@HEAD:"):
        with pytest.raises(argparse.ArgumentTypeError):
            interplay.parse_variant(bad)


def test_arguments_default_to_one_variant_and_refuse_nonsense() -> None:
    args = interplay.parse_args([])
    assert args.variant == [("server", {})] and args.n == 10_000 and args.connections == [1, 8]
    for bad in (["--rounds", "0"], ["--env", "CERTIFY_CHUNK=3"], ["--variant", "a:", "--variant", "a:"]):
        with pytest.raises(SystemExit):
            interplay.parse_args(bad)


def test_phase_row_is_the_median() -> None:
    runs = [{"rps": 10.0}, {"rps": 30.0}, {"rps": 20.0}]
    assert interplay.phase_row(runs, "rps") == 20.0
