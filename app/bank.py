"""Live bank updates (issue 15): labelled examples added to a served model's k-NN bank without retraining.

The shipped artifact stays read-only. What was added lives in an overlay per model under the state
directory (`SATML_STATE_DIR/<model>/`):

    overlay.json                 {"format_version": 1, "model", "artifact": {encoder/bank sha256},
                                  "version", "classes": [added class names], "examples": [{id, label,
                                  time, filename, sha256}], "embeddings": {file, sha256, rows, dim} | null}
    examples-<version>.safetensors  "embeddings" [M, D] float32, row i = examples[i]

Every write is atomic (temp file + fsync + os.replace + fsync of the folder): first the new embeddings
file (a new name per version), then overlay.json, which points at it; the old embeddings file is deleted
only after. A crash at any point leaves overlay.json naming a complete, hashed embeddings file: the
previous version or the new one. An update is acknowledged only after overlay.json is replaced, so
nothing acknowledged is lost. At start-up the overlay is replayed; one that fails any check (JSON, format,
hashes, shapes, labels, or an artifact whose encoder changed since) is moved aside with an error log line
and the model serves its shipped bank.

Serving reads one reference, `LiveBank.state` (an immutable `BankState`: classes, bank, labels, vote cap,
index). An update builds the next state off to the side (new tensors, new index), persists it, then
swaps that reference: a batch of /classify uses one state from start to end. Updates of one model are
serialised by `LiveBank.lock`. Classes only grow while the process runs (ids stay valid for answers in
flight); a new class whose examples were all deleted is dropped at the next start.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from app.logs import fields
from training import knn
from training.artifact import Artifact
from training.files import set_aside

log = logging.getLogger("app.bank")

FORMAT_VERSION = 1
OVERLAY = "overlay.json"
LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 _.\-]{0,62}[A-Za-z0-9_.\-])?")
Index = Callable[[Tensor], tuple[Tensor, Tensor]]


class OverlayError(Exception):
    """An overlay that cannot be replayed (corrupt, foreign, or for another encoder)."""


def valid_label(label: str) -> str | None:
    """None when `label` is an acceptable class name, else why not (1-64 characters: letters, digits,
    space, `_ . -`; starting with a letter or digit, not ending with a space)."""
    if not LABEL_RE.fullmatch(label):
        return ("a class name is 1-64 characters of letters, digits, space, '_', '.', '-', starting with a "
                "letter or digit and not ending with a space")
    return None


@dataclass(frozen=True)
class Example:
    id: str
    label: str
    time: str  # ISO 8601, UTC
    filename: str
    sha256: str  # of the uploaded file's bytes


@dataclass
class BankState:
    """One version of a model's bank. Never changed after it is published (except `index`, built once
    on the batch worker thread when the backend must live there: faiss GPU)."""

    version: int
    classes: tuple[str, ...]  # shipped classes, then the added ones
    examples: tuple[Example, ...]
    embeddings: Tensor  # [M, D] float32 on the CPU, row i = examples[i]
    bank: Tensor  # [N + M, D] on the model's device
    labels: Tensor  # [N + M] int64
    rule: knn.VoteRule  # the vote over this bank (knn.vote_rule: its cap or class weights); majority if neither
    index: Index | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(self.bank.shape[0])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds either its old content or all of `data`, whatever happens (temp + fsync + replace)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def artifact_identity(art: Artifact) -> dict[str, str]:
    """What the overlay's embeddings depend on: the encoder (and the shipped bank they extend)."""
    files = art.spec.files
    return {"encoder_sha256": str(files.get("encoder.safetensors", "")),
            "bank_sha256": str(files.get("bank.safetensors", ""))}


class OverlayStore:
    """The overlay files of one model in `folder` (created on the first save)."""

    def __init__(self, folder: Path, model: str, identity: dict[str, str]) -> None:
        self.folder, self.model, self.identity = folder, model, identity

    @property
    def path(self) -> Path:
        return self.folder / OVERLAY

    def save(self, version: int, classes: list[str], examples: list[Example], embeddings: Tensor) -> None:
        """Persist one version; returns once it is durable (the acknowledgement point)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        emb: dict[str, Any] | None = None
        if len(examples):
            data = st_save({"embeddings": embeddings.detach().float().cpu().contiguous()})
            name = f"examples-{version:08d}.safetensors"
            write_atomic(self.folder / name, data)
            emb = {"file": name, "sha256": _sha256(data), "rows": int(embeddings.shape[0]),
                   "dim": int(embeddings.shape[1])}
        doc = {"format_version": FORMAT_VERSION, "model": self.model, "artifact": self.identity, "version": version,
               "classes": classes, "examples": [asdict(e) for e in examples], "embeddings": emb}
        write_atomic(self.path, json.dumps(doc, indent=1).encode())
        keep = emb["file"] if emb else None
        for p in self.folder.glob("examples-*.safetensors"):  # superseded versions (and a crash's leftovers)
            if p.name != keep:
                p.unlink(missing_ok=True)

    def load(self, dim: int) -> tuple[int, list[str], list[Example], Tensor] | None:
        """(version, added classes, examples, embeddings [M, dim]) or None when there is no overlay;
        OverlayError when it cannot be trusted."""
        for p in self.folder.glob(".*.tmp-*"):  # a crash's half-written temp files: never read
            p.unlink(missing_ok=True)
        if not self.path.is_file():
            return None
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as e:
            raise OverlayError(f"{self.path}: unreadable JSON ({e})") from e
        if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
            got = doc.get("format_version") if isinstance(doc, dict) else None
            raise OverlayError(f"{self.path}: unknown format_version {got!r}")
        if doc.get("artifact") != self.identity:
            raise OverlayError(f"{self.path}: written for another version of the artifact (encoder or bank "
                               "sha256 differ): its embeddings do not fit this encoder")
        try:
            version = int(doc["version"])
            classes = [str(c) for c in doc["classes"]]
            examples = [Example(**{k: str(e[k]) for k in ("id", "label", "time", "filename", "sha256")})
                        for e in doc["examples"]]
            emb = doc["embeddings"]
        except (KeyError, TypeError, ValueError) as e:
            raise OverlayError(f"{self.path}: malformed ({e!r})") from e
        if not examples:
            return version, classes, [], torch.zeros(0, dim)
        try:
            data = (self.folder / Path(str(emb["file"])).name).read_bytes()
        except (OSError, KeyError, TypeError) as e:
            raise OverlayError(f"{self.path}: embeddings file missing ({e})") from e
        if _sha256(data) != emb.get("sha256"):
            raise OverlayError(f"{self.path}: sha256 mismatch of {emb['file']}")
        try:
            z = st_load(data)["embeddings"].float()
        except Exception as e:  # safetensors raises its own error types on a bad header
            raise OverlayError(f"{self.path}: unreadable {emb['file']} ({e})") from e
        if tuple(z.shape) != (len(examples), dim):
            raise OverlayError(f"{self.path}: embeddings {tuple(z.shape)}, expected ({len(examples)}, {dim})")
        if not torch.isfinite(z).all():
            raise OverlayError(f"{self.path}: non-finite embeddings")
        return version, classes, examples, z

    def move_aside(self) -> Path:
        """Keep a refused overlay for inspection, out of the way of the next save."""
        return set_aside(self.path, "refused")


class LiveBank:
    """A served model's bank: the shipped one plus the overlay; `state` is what serving reads."""

    def __init__(self, model: str, art: Artifact, index_kind: str, vote: str,
                 build: Callable[[str, Tensor, Tensor, int, knn.VoteRule], Index], state_dir: Path | None) -> None:
        self.model, self.art, self.index_kind, self.vote = model, art, index_kind, vote
        self._build = build  # (kind, bank, labels, num_classes, rule) -> index; app.index.build_index_over
        self.shipped_classes = tuple(art.classes)
        self.shipped_size = int(art.bank.shape[0])
        self.dim = int(art.bank.shape[1])
        self.store = OverlayStore(state_dir / model, model, artifact_identity(art)) if state_dir else None
        self.lock = asyncio.Lock()  # serialises updates of this model (bound to the serving loop at first use)
        knn.vote_rule(vote, art.bank_labels, art.num_classes, art.k)  # ValueError on an unknown vote
        # the shipped bank's index is built by the serving predictor on its worker thread (app.predictor), or not
        # at all where the fused onnxruntime graph votes over the shipped bank (app.fused)
        self.state = self._make(0, self.shipped_classes, (), torch.zeros(0, self.dim), eager=False)
        self.on_swap: list[Callable[[BankState], None]] = []

    @property
    def persistent(self) -> bool:
        return self.store is not None

    def _make(self, version: int, classes: tuple[str, ...], examples: tuple[Example, ...], z: Tensor,
              eager: bool = True) -> BankState:
        """A new state off to the side: bank and labels as new tensors, the index built unless it must be
        built on the worker thread (faiss GPU)."""
        art = self.art
        ids = {c: i for i, c in enumerate(classes)}
        added = torch.tensor([ids[e.label] for e in examples], dtype=torch.long)
        bank = torch.cat([art.bank, z.to(art.bank.device, art.bank.dtype)]) if len(examples) else art.bank
        labels = torch.cat([art.bank_labels, added.to(art.bank_labels.device)]) if len(examples) else art.bank_labels
        rule = knn.vote_rule(self.vote, labels, len(classes), art.k)
        st = BankState(version, classes, examples, z.float().cpu(), bank, labels, rule)
        if eager and self.index_kind != "faiss-gpu":
            st.index = self._build(self.index_kind, bank, labels, len(classes), rule)
        return st

    def index(self) -> Index:
        """On the batch worker thread: the index of the current state (one reference read)."""
        st = self.state
        if st.index is None:
            st.index = self._build(self.index_kind, st.bank, st.labels, len(st.classes), st.rule)
        return st.index

    def replay(self) -> None:
        """At start-up: the overlay, if any and sound; else (logged) the shipped bank alone."""
        if self.store is None:
            return
        try:
            loaded = self.store.load(self.dim)
            if loaded is None:
                return
            version, added_classes, examples, z = loaded
            used = {e.label for e in examples}
            classes = list(self.shipped_classes)
            for c in added_classes:  # compaction: an added class with no example left is dropped now
                if c in used and c not in classes and valid_label(c) is None:
                    classes.append(c)
            unknown = used - set(classes)
            if unknown:
                raise OverlayError(f"{self.store.path}: examples of classes not in the overlay: {sorted(unknown)[:5]}")
            self._publish(self._make(version, tuple(classes), tuple(examples), z))
        except OverlayError as e:
            moved = self.store.move_aside() if self.store.path.exists() else None
            log.error("bank overlay skipped: serving the shipped bank", extra=fields(
                event="overlay_skipped", model=self.model, reason=str(e), moved_to=str(moved) if moved else None))
            return
        log.info("bank overlay replayed", extra=fields(event="overlay_replayed", model=self.model,
                                                      version=self.state.version, added=len(self.state.examples),
                                                      classes=len(self.state.classes), bank=self.state.size))

    def _publish(self, st: BankState) -> None:
        self.state = st  # the one reference serving reads: a batch sees the old state or the new one, whole
        for fn in self.on_swap:
            fn(st)

    def _commit(self, classes: tuple[str, ...], examples: tuple[Example, ...], z: Tensor) -> BankState:
        """Build, persist (the acknowledgement), publish. Caller holds `lock`; runs in a worker thread."""
        cur = self.state
        st = self._make(cur.version + 1, classes, examples, z)
        if self.store is not None:
            self.store.save(st.version, list(classes[len(self.shipped_classes):]), list(examples), st.embeddings)
        self._publish(st)
        return st

    def add(self, label: str, z: Tensor, filenames: list[str], hashes: list[str]) -> tuple[BankState, list[str]]:
        """Append examples of `label` (a new class is appended to the classes). Caller holds `lock`."""
        cur = self.state
        classes = cur.classes if label in cur.classes else (*cur.classes, label)
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        new = tuple(Example(uuid.uuid4().hex, label, now, f, h) for f, h in zip(filenames, hashes, strict=True))
        st = self._commit(classes, cur.examples + new, torch.cat([cur.embeddings, z.float().cpu()]))
        return st, [e.id for e in new]

    def remove(self, keep: Callable[[Example], bool]) -> tuple[BankState, list[str]]:
        """Drop the added examples `keep` rejects (classes stay while the process runs). Caller holds `lock`."""
        cur = self.state
        rows = [i for i, e in enumerate(cur.examples) if keep(e)]
        gone = [e.id for e in cur.examples if not keep(e)]
        if not gone:
            return cur, []
        z = cur.embeddings[rows] if rows else torch.zeros(0, self.dim)
        return self._commit(cur.classes, tuple(cur.examples[i] for i in rows), z), gone
