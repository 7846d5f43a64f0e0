"""Typed results of the suite's stages: each stage returns these and the next reads their fields.

The JSON document (`robustness.json`) is their `to_json()`, field for field; the reports render that document,
so a report can be regenerated from an earlier run's file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class _Row:
    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object; optional fields that are None are left out."""
        optional = getattr(self, "_optional", ())
        return {k: v for k, v in asdict(self).items() if not (k in optional and v is None)}  # type: ignore[call-overload]


@dataclass
class CleanResult(_Row):
    acc: float
    n: int
    exact_acc: float
    exact_n: int
    seconds: float
    protocol: str


@dataclass
class AttackRow(_Row):
    """One attack of the main table at the main eps: robust accuracy over the n attacked images."""

    attack: str
    kind: str
    eps: float
    steps: int
    acc: float
    n: int
    worst_case: bool  # part of the per-image worst case
    seconds: float
    protocol: str
    surrogate: dict[str, Any] | None = None  # the soft-kNN stand-in differentiated (None: embedding attacks)
    chained: bool = False  # run only on the survivors of the attacks before it
    norm: str = "linf"
    source: str | None = None  # transfer: the model the images were crafted on
    source_sha256: str | None = None
    _optional = ("source", "source_sha256")


@dataclass
class EpsRow(_Row):
    """One radius of the eps sweep: the running worst case and the paper's guided attack."""

    eps: float
    eps_255: float
    worst_case_acc: float
    guided_acc: float
    n: int
    protocol: str
    worst_case_bits: str  # per image, '1' = still robust


@dataclass
class PaperRow(_Row):
    """The paper's defence success rate beside the adaptive one, at one of its radii."""

    eps: float
    n_attacked: int
    defence_success_rate: float
    adaptive_defence_rate: float
    paper_reported: str | None
    protocol: str


@dataclass
class MaskingCheck(_Row):
    check: str
    passed: bool | None  # None: information only
    value: Any
    detail: str


@dataclass
class WorstCase(_Row):
    acc: float
    n: int
    eps: float
    attacks: list[str] = field(default_factory=list)
    acc_attacks_at_eps_only: float = 0.0
    protocol: str = ""


def to_json(rows: list[Any]) -> list[dict[str, Any]]:
    return [r.to_json() for r in rows]
