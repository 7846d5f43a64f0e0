"""What `manifest.json` says (DESIGN section 3), typed: one dataclass per section.

Every reader and writer of the manifest goes through `Manifest` (`training.artifact` reads, writes and
updates the folder around it), so each field is named, typed and defaulted here once instead of in
`.get()` chains. Two rules keep old and future manifests loading and round-tripping unchanged:

- keys this code does not know ride along in each section's `extra` and are written back after the
  known ones, so a manifest from newer code, or one edited by hand, keeps them;
- a key or section that may be absent (`training`, `metrics`, `bank_size`, ...) is `None` and stays
  absent on a rewrite; a key with a real default (`knn.metric` "l2", `encoder.proj_dim` 128) is written.

Fields are declared in the order `training.export` writes them, so `to_dict` reproduces its key order.
Pure Python (no torch): the server, the trainer and the suite can all import it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

FORMAT_VERSION = 1


def _need(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ValueError(f"missing key {where + key!r}")
    return d[key]


def _section(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{where.rstrip('.')} must be a JSON object, got {type(d).__name__}")
    return d


def _opt(d: dict[str, Any], key: str, cast: Any) -> Any:
    return None if d.get(key) is None else cast(d[key])


def _floats(v: Any) -> tuple[float, ...]:
    return tuple(float(x) for x in v)


def _extra(d: dict[str, Any], cls: type) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k not in known}


def _plain(v: Any) -> Any:
    if is_dataclass(v):
        return v.to_dict()  # type: ignore[union-attr]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return dict(v)
    return v


class _Section:
    """JSON form of a section: known fields in declaration order, an absent optional one left out, then `extra`."""

    extra: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.default is None):
                continue
            out[f.name] = _plain(value)
        return {**out, **self.extra}


@dataclass(kw_only=True)
class InputSpec(_Section):
    """What the encoder takes: RGB in `value_range`, `size` x `size`; normalisation happens inside the model."""

    size: int
    channels: int = 3
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: tuple[float, ...] = (0.0, 1.0)
    resize: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> InputSpec:
        d = _section(d, "input.")
        return cls(size=int(_need(d, "size", "input.")), channels=int(d.get("channels", 3)),
                   mean=_floats(_need(d, "mean", "input.")), std=_floats(_need(d, "std", "input.")),
                   value_range=_floats(d.get("value_range", (0.0, 1.0))), resize=_opt(d, "resize", str),
                   extra=_extra(d, cls))


@dataclass(kw_only=True)
class EncoderSpec(_Section):
    """The architecture to rebuild before loading `encoder.safetensors` (see `training.models.EncoderConfig`)."""

    arch: str
    width: int
    proj_dim: int = 128
    mean: tuple[float, ...] | None = None  # a copy of input.mean (EncoderConfig.to_dict writes it)
    std: tuple[float, ...] | None = None
    embed_dim: int | None = None
    normalize: bool = True
    reduce_dim: int | None = None  # the export-time PCA map's output size (EncoderConfig.reduce_dim); None: no map
    # true: the embedding is the mean over the image and its mirror image (EncoderConfig); None (omitted): not
    mirror_average: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. onnx_max_abs_diff (null when no ONNX was written)

    @classmethod
    def from_dict(cls, d: Any) -> EncoderSpec:
        d = _section(d, "encoder.")
        return cls(arch=str(_need(d, "arch", "encoder.")), width=int(_need(d, "width", "encoder.")),
                   proj_dim=int(d.get("proj_dim", 128)), mean=_opt(d, "mean", _floats), std=_opt(d, "std", _floats),
                   embed_dim=_opt(d, "embed_dim", int), normalize=bool(d.get("normalize", True)),
                   reduce_dim=_opt(d, "reduce_dim", int), mirror_average=_opt(d, "mirror_average", bool),
                   extra=_extra(d, cls))


@dataclass(kw_only=True)
class KnnSurrogate(_Section):
    """The soft-kNN surrogate `/attack` differentiates: the one the robustness suite found strongest."""

    temperature: float
    k: int | None  # None: softmax over the whole bank; k: over the k nearest (written as null, never left out)
    chosen_by: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> KnnSurrogate:
        d = _section(d, "knn.surrogate.")
        return cls(temperature=float(_need(d, "temperature", "knn.surrogate.")), k=_opt(d, "k", int),
                   chosen_by=_opt(d, "chosen_by", str), extra=_extra(d, cls))


@dataclass(kw_only=True)
class KnnSpec(_Section):
    """The served classifier: hard majority vote of the k nearest bank embeddings."""

    k: int
    metric: str = "l2"
    vote: str = "majority"
    surrogate: KnnSurrogate | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> KnnSpec:
        d = _section(d, "knn.")
        sur = d.get("surrogate")
        return cls(k=int(_need(d, "k", "knn.")), metric=str(d.get("metric", "l2")), vote=str(d.get("vote", "majority")),
                   surrogate=None if sur is None else KnnSurrogate.from_dict(sur), extra=_extra(d, cls))


@dataclass(kw_only=True)
class TrainingInfo(_Section):
    """Provenance for the card: method, hyper-parameters, seed and code; all but `method` may be absent."""

    method: str = "unknown"
    hyperparameters: dict[str, Any] | None = None
    epochs: int | None = None
    seed: int | None = None
    code_version: str | None = None
    train_seconds: float | None = None
    steps: int | None = None
    device: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    REQUIRED = ("method", "hyperparameters", "epochs", "seed", "code_version")  # what export insists on

    @classmethod
    def from_dict(cls, d: Any) -> TrainingInfo:
        d = _section(d, "training.")
        return cls(method=str(d.get("method", "unknown")), hyperparameters=d.get("hyperparameters"),
                   epochs=_opt(d, "epochs", int), seed=_opt(d, "seed", int), code_version=_opt(d, "code_version", str),
                   train_seconds=_opt(d, "train_seconds", float), steps=_opt(d, "steps", int),
                   device=_opt(d, "device", str), extra=_extra(d, cls))


@dataclass(kw_only=True)
class RobustResult(_Section):
    """One measured robust accuracy: export's PGD check (`temperature`, `random_start`) or a suite row (`suite`)."""

    attack: str
    norm: str = "linf"
    eps: float
    steps: int | None  # None: not a step count (written as null)
    acc: float
    n: int
    temperature: float | None = None
    random_start: bool | None = None
    suite: str | None = None  # "robustness": replaced by the next suite run
    code_version: str | None = None
    quick: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> RobustResult:
        d = _section(d, "metrics.robust[].")
        need = lambda key: _need(d, key, "metrics.robust[].")  # noqa: E731
        return cls(attack=str(need("attack")), norm=str(d.get("norm", "linf")), eps=float(need("eps")),
                   steps=_opt(d, "steps", int), acc=float(need("acc")), n=int(need("n")),
                   temperature=_opt(d, "temperature", float), random_start=_opt(d, "random_start", bool),
                   suite=_opt(d, "suite", str), code_version=_opt(d, "code_version", str), quick=_opt(d, "quick", bool),
                   extra=_extra(d, cls))


@dataclass(kw_only=True)
class Metrics(_Section):
    """Measured accuracy (fractions in [0, 1]) on the test set; what /models and the card show."""

    clean_acc: float | None = None
    clean_n: int | None = None
    robust: list[RobustResult] | None = None
    eval_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> Metrics:
        d = _section(d, "metrics.")
        robust = d.get("robust")
        if robust is not None and not isinstance(robust, list):
            raise ValueError("metrics.robust must be a list")
        return cls(clean_acc=_opt(d, "clean_acc", float), clean_n=_opt(d, "clean_n", int),
                   robust=None if robust is None else [RobustResult.from_dict(r) for r in robust],
                   eval_seconds=_opt(d, "eval_seconds", float), extra=_extra(d, cls))


@dataclass(kw_only=True)
class Calibration(_Section):
    """Where the conformal calibration scores (`training.conformal`) came from; the file itself is hashed."""

    file: str
    nonconformity: str | None = None
    n: int
    split: str | None = None
    clean_accuracy_on_split: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> Calibration:
        d = _section(d, "calibration.")
        return cls(file=str(_need(d, "file", "calibration.")), nonconformity=_opt(d, "nonconformity", str),
                   n=int(_need(d, "n", "calibration.")), split=_opt(d, "split", str),
                   clean_accuracy_on_split=_opt(d, "clean_accuracy_on_split", float), extra=_extra(d, cls))


@dataclass(kw_only=True)
class BankAdversarial(_Section):
    """Adversarial rows appended to the bank (`satml harden-bank`, `training.adversarial_bank`): `attacked` bank
    images were attacked (`attack` on the soft-kNN surrogate at `temperature`, `steps` steps of L-inf radius `eps`,
    random starts seeded with `seed` per `chunk` images) and the embeddings of the `rows` whose vote flipped (the
    first `max_rows` in bank order, when capped) follow the clean rows, labelled with their images' labels."""

    attack: str
    eps: float
    steps: int
    temperature: float
    seed: int = 0
    chunk: int
    attacked: int
    rows: int
    max_rows: int | None = None  # the rows were capped at the first max_rows flipped ones (None, omitted: not)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> BankAdversarial:
        d, w = _section(d, "bank_adversarial."), "bank_adversarial."
        return cls(attack=str(_need(d, "attack", w)), eps=float(_need(d, "eps", w)), steps=int(_need(d, "steps", w)),
                   temperature=float(_need(d, "temperature", w)), seed=int(d.get("seed", 0)),
                   chunk=int(_need(d, "chunk", w)), attacked=int(_need(d, "attacked", w)),
                   rows=int(_need(d, "rows", w)), max_rows=_opt(d, "max_rows", int), extra=_extra(d, cls))


@dataclass(kw_only=True)
class Manifest(_Section):
    """The whole manifest. `files` maps each plain file name of the folder to its sha256 hex digest."""

    format_version: int = FORMAT_VERSION
    name: str
    description: str = ""
    dataset: str | None = None
    classes: list[str]
    input: InputSpec
    encoder: EncoderSpec
    knn: KnnSpec
    bank_size: int | None = None  # training images in the bank
    # bank rows per image: absent (1), or 2 when the rows of the mirrored images follow the originals' (export
    # --bank-mirror); the bank then holds bank_size * bank_views rows
    bank_views: int | None = None
    # the adversarial rows after the bank_size * bank_views clean ones (`satml harden-bank`); None (omitted): none
    bank_adversarial: BankAdversarial | None = None
    training: TrainingInfo | None = None
    metrics: Metrics | None = None
    files: dict[str, str] = field(default_factory=dict)
    calibration: Calibration | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    REQUIRED = ("name", "classes", "input", "encoder", "knn", "files")  # the rest may be absent

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Parse a manifest's JSON; ValueError naming the first missing or malformed key."""
        for key in cls.REQUIRED:
            _need(d, key, "")
        files, classes = d["files"], d["classes"]
        # a list or null digests would otherwise escape as AttributeError/TypeError, not as a refusal
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise ValueError("files must map each file name to its sha256 hex digest")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError("classes must be a non-empty list of names")
        section: dict[str, Any] = {"bank_adversarial": BankAdversarial, "training": TrainingInfo, "metrics": Metrics,
                                   "calibration": Calibration}
        optional = {k: None if d.get(k) is None else c.from_dict(d[k]) for k, c in section.items()}
        return cls(format_version=d.get("format_version", FORMAT_VERSION), name=str(d["name"]),
                   description=str(d.get("description", "")), dataset=_opt(d, "dataset", str), classes=list(classes),
                   input=InputSpec.from_dict(d["input"]), encoder=EncoderSpec.from_dict(d["encoder"]),
                   knn=KnnSpec.from_dict(d["knn"]), bank_size=_opt(d, "bank_size", int),
                   bank_views=_opt(d, "bank_views", int), files=dict(files),
                   extra=_extra(d, cls), **optional)

    def bank_images(self, rows: int) -> int:
        """Training images behind a bank of `rows` rows (the split rebuilds check against this, not the rows)."""
        return self.bank_size if self.bank_size is not None else rows // (self.bank_views or 1)

    @property
    def method(self) -> str:
        """Training method (ssl, sat, supervised, ...); 'unknown' for a manifest without `training`."""
        return self.training.method if self.training else "unknown"

    @property
    def model_sha256(self) -> str:
        """Identity of the served model: sha256 over the recorded encoder and bank digests and the vote (k, metric,
        vote), the cache key of the suite: the same weights voting with another k are another model whose attack
        results must not be reused. Unchanged by card, calibration or metric updates."""
        files, v = self.files, self.knn
        served = f"{files['encoder.safetensors']}:{files['bank.safetensors']}"
        if (v.k, v.metric, v.vote) != (75, "l2", "majority"):  # keeps every earlier model's identity (and cache)
            served += f":k={v.k}:{v.metric}:{v.vote}"
        if self.encoder.mirror_average:  # the same weights averaged over the mirror image are another function
            served += ":mirror_average"
        return hashlib.sha256(served.encode()).hexdigest()

