"""Dataset loaders for the official on-disk layouts a user already has (DESIGN section 7).

Readers for CIFAR-10 (`cifar-10-batches-py/` or `cifar-10-python.tar.gz`), STL-10 binaries and a
plain image folder, all returning one in-memory `ImageDataset` of uint8 HWC RGB images. Nothing is
ever downloaded: a missing or malformed dataset raises `DatasetError` naming the path and the layout
that was expected there. CIFAR files are pickles, so they are read with an unpickler that can only
rebuild numpy arrays (no arbitrary code runs while loading).
"""

from __future__ import annotations

import importlib
import io
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "CIFAR_VAL_SIZE",
    "DatasetError",
    "ImageDataset",
    "SplitSpec",
    "has_test_split",
    "load_cifar10",
    "load_dataset",
    "load_image_folder",
    "load_split",
    "load_stl10",
    "train_val_split",
    "validation_split",
]


class DatasetError(ValueError):
    """Missing or malformed dataset; message names the path and the expected layout."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images with integer labels, held in memory; label -1 marks an unlabeled image."""

    images: np.ndarray  # uint8 [N, H, W, 3], HWC, RGB
    labels: np.ndarray  # int64 [N]
    classes: tuple[str, ...]
    kind: str = "arrays"  # the loader it came from: cifar10 | stl10 | folder; picks the validation split

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be int64 [{len(self.images)}], got {self.labels.dtype} {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: slice | np.ndarray) -> ImageDataset:
        """The images at `indices` (a slice gives views, an index array copies); classes are kept."""
        return ImageDataset(self.images[indices], self.labels[indices], self.classes, self.kind)


# ---------------------------------------------------------------- validation split

CIFAR_VAL_SIZE = 5000  # CIFAR-10's documented split: the last 5,000 training images (DESIGN section 6)
VAL_FRACTION = 0.1


def train_val_split(ds: ImageDataset, val_size: int = CIFAR_VAL_SIZE) -> tuple[ImageDataset, ImageDataset]:
    """Hold out the LAST `val_size` images (CIFAR-10's documented split, DESIGN section 6): (train, val)."""
    if not 0 < val_size < len(ds):
        raise ValueError(f"val_size must be in [1, {len(ds) - 1}] for a dataset of {len(ds)}, got {val_size}")
    cut = len(ds) - val_size
    return ds.subset(slice(0, cut)), ds.subset(slice(cut, None))


def _per_class_counts(counts: np.ndarray, val_size: int | None, fraction: float) -> np.ndarray:
    """Validation images per class: a `fraction` of each class, or one each plus the rest of `val_size`
    shared in proportion to the class sizes (largest remainders first, ties to the lower class id).
    Every class that has images gets at least one."""
    present = (counts > 0).astype(np.int64)
    if val_size is None:
        return np.where(present, np.maximum(1, np.round(counts * fraction)), 0).astype(np.int64)
    spare, rest = counts - present, val_size - int(present.sum())
    if rest <= 0 or spare.sum() == 0:
        return present
    exact = rest * spare / spare.sum()
    out = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(counts)), -(exact - out)))
    out[order[: rest - int(out.sum())]] += 1
    return present + out


def validation_split(ds: ImageDataset, val_size: int | None = None, *, fraction: float = VAL_FRACTION,
                     seed: int = 0) -> tuple[ImageDataset, ImageDataset | None]:
    """The (train, validation) split every command uses: train, export (the bank), calibrate, evaluate.

    CIFAR-10 keeps its documented split, the last `val_size` images (default 5,000), so the shipped
    models' numbers stay comparable. Every other kind is stratified and seeded: each class gives a
    `fraction` of its images (at least one), or `val_size` in all in proportion to the class sizes,
    drawn with `seed`, so a class-sorted folder never puts one whole class in validation. val_size 0:
    no validation. A class too small to give a validation image and keep one for the bank is an error
    that names it. Train keeps the original order; validation is shuffled, so any prefix of it (the
    periodic check's `eval_size`) is a random sample.
    """
    if val_size == 0:
        return ds, None
    if val_size is not None and val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    if ds.kind == "cifar10":
        return train_val_split(ds, CIFAR_VAL_SIZE if val_size is None else val_size)
    labelled = ds.labels >= 0
    counts = np.bincount(ds.labels[labelled], minlength=len(ds.classes))
    present = int((counts > 0).sum())
    if val_size is not None and not present <= val_size <= int(counts.sum()) - present:
        raise DatasetError(f"val_size {val_size} does not fit {int(counts.sum())} labelled images in {present} "
                           "classes: every class needs at least one validation image "
                           "and one training image; pass a smaller --val-size, or omit it for "
                           f"{VAL_FRACTION:.0%} of each class")
    take = _per_class_counts(counts, val_size, fraction)
    for c in np.flatnonzero(counts):
        if take[c] >= counts[c]:
            raise DatasetError(f"class {ds.classes[c]!r} has {counts[c]} image(s): too few to hold {take[c]} out for "
                               "validation and keep one for training; add images to it, or pass --val-size 0 "
                               "(no validation split)")
    rng = np.random.default_rng(seed)
    val_parts = [rng.permutation(np.flatnonzero(ds.labels == c))[: take[c]] for c in range(len(ds.classes))]
    val_idx = rng.permutation(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    keep = np.ones(len(ds), dtype=bool)
    keep[val_idx] = False
    return ds.subset(np.flatnonzero(keep)), ds.subset(val_idx)


@dataclass(frozen=True)
class SplitSpec:
    """What picks the training and validation images of a dataset; stored in every checkpoint's config, so
    export, calibrate and evaluate rebuild exactly the split training used."""

    val_size: int | None = None
    val_fraction: float = VAL_FRACTION
    val_seed: int = 0
    limit: int | None = None  # only the first `limit` training images (quick runs, tests)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SplitSpec:
        """From a TrainConfig dict (a checkpoint's `config`, a manifest's hyper-parameters)."""
        return cls(val_size=config.get("val_size"), val_fraction=config.get("val_fraction", VAL_FRACTION),
                   val_seed=config.get("val_seed", 0), limit=config.get("limit"))

    def apply(self, full: ImageDataset) -> tuple[ImageDataset, ImageDataset | None]:
        if self.limit:
            full = full.subset(slice(0, self.limit))
        return validation_split(full, self.val_size, fraction=self.val_fraction, seed=self.val_seed)

    def describe(self, full: ImageDataset) -> str:
        """One line for manifests and logs: which images are held out."""
        n = min(len(full), self.limit) if self.limit else len(full)
        if self.val_size == 0:
            return "none (all training images are in the bank)"
        if full.kind == "cifar10":
            size = CIFAR_VAL_SIZE if self.val_size is None else self.val_size
            return f"training images {n - size}..{n - 1} (held out of the bank; the validation split)"
        share = f"{self.val_fraction:.0%} of each class (at least 1)" if self.val_size is None else (
            f"{self.val_size} images in proportion to the class sizes")
        return f"stratified: {share}, seed {self.val_seed} (held out of the bank; the validation split)"


def load_split(data: str | Path, spec: SplitSpec) -> tuple[ImageDataset, ImageDataset | None]:
    """Load the training images at `data` and split them by `spec`: (train = the bank, validation or None)."""
    return spec.apply(load_dataset(data, "train"))


def mirrored(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images flipped left-right (the bank's mirror view, `satml export --bank-mirror`)."""
    return np.ascontiguousarray(images[:, :, ::-1])


def recorded_validation(hp: dict[str, Any] | None, full: ImageDataset, bank_size: int,
                        owner: str) -> ImageDataset | None:
    """The validation images of the split a run recorded (`hp`: its checkpoint config or manifest hyper-parameters),
    checked against the bank it built from `full`; None when `hp` records no split (hand-made artifacts). One
    rebuild for calibration, the robustness suite and the benchmarks."""
    if not hp or "val_size" not in hp:
        return None
    bank, val = SplitSpec.from_config(hp).apply(full)
    if len(bank) != bank_size:
        raise ValueError(f"{owner}: the bank holds {bank_size} images but the data, split as in training, gives "
                         f"{len(bank)}: not the data this artifact was exported from?")
    if val is None:
        raise ValueError(f"{owner}: trained with --val-size 0: no validation split")
    return val


# ---------------------------------------------------------------- CIFAR-10 (python pickles)

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TAR = "cifar-10-python.tar.gz"
_CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_LAYOUT = (
    f"expected {CIFAR_DIR}/ with batches.meta, data_batch_1..5 and test_batch (pickled dicts with "
    f"b'data' uint8 [n, 3072] and b'labels'), a folder containing it, or {CIFAR_TAR} (or a folder holding it)"
)


def _numpy_reconstruct() -> Callable[..., Any]:
    """numpy's array-unpickling helper, wherever this numpy version keeps it."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy multiarray._reconstruct not found")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals the official CIFAR pickles use (numpy arrays).

    Any other global (os.system, builtins.eval, ...) is refused before it can be called.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def __init__(self, file: BinaryIO, path: str) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise DatasetError(
                f"{self._path}: refusing to unpickle global {module}.{name}; "
                "CIFAR-10 batch files contain only builtin types and numpy arrays"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def _unpickle(file: BinaryIO, path: str) -> dict[str, Any]:
    """Load one CIFAR pickle safely; keys are returned as str whether stored as bytes or str."""
    try:
        obj = _RestrictedUnpickler(file, path).load()
    except DatasetError:
        raise
    except Exception as e:  # truncated or garbled bytes surface as many different exception types
        raise DatasetError(f"{path}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e}); {_CIFAR_LAYOUT}") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}; {_CIFAR_LAYOUT}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _parse_batch(d: dict[str, Any], path: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch dict -> (images uint8 [n, 32, 32, 3], labels int64 [n]), checking every field."""
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DatasetError(f"{path}: missing b'data' array or b'labels' list; {_CIFAR_LAYOUT}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 [n, 3072]; {_CIFAR_LAYOUT}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DatasetError(f"{path}: b'labels' is not a list of ints; {_CIFAR_LAYOUT}") from e
    if y.shape != (len(data),):
        raise DatasetError(f"{path}: {y.size} labels for {len(data)} images; {_CIFAR_LAYOUT}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(f"{path}: labels outside [0, {num_classes}); {_CIFAR_LAYOUT}")
    # each row is the R, G, B planes of a 32x32 row-major image: [n, c, y, x] -> [n, y, x, c]
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, y


def _parse_meta(d: dict[str, Any], path: str) -> tuple[str, ...]:
    names = d.get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes | str) for n in names):
        raise DatasetError(f"{path}: expected b'label_names' (a list of names); {_CIFAR_LAYOUT}")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in names)


def _read_cifar_dir(folder: Path, members: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in members:
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"{path}: file not found; {_CIFAR_LAYOUT}")
        with path.open("rb") as f:
            out[name] = _unpickle(f, str(path))
    return out


def _read_cifar_tar(tar_path: Path, members: list[str]) -> dict[str, dict[str, Any]]:
    """Read the wanted members in one streaming pass over the archive; nothing is extracted to disk."""
    wanted = {f"{CIFAR_DIR}/{m}": m for m in members}
    out: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(tar_path, mode="r|*") as tar:
            for info in tar:
                name = wanted.get(info.name.removeprefix("./"))
                if name is None or not info.isfile():
                    continue
                f = tar.extractfile(info)
                assert f is not None, "regular tar members always have a file object"
                out[name] = _unpickle(io.BytesIO(f.read()), f"{tar_path}:{info.name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DatasetError(f"{tar_path}: not a readable tar archive ({e}); {_CIFAR_LAYOUT}") from e
    missing = [f"{CIFAR_DIR}/{m}" for m in members if m not in out]
    if missing:
        raise DatasetError(f"{tar_path}: archive lacks {', '.join(missing)}; {_CIFAR_LAYOUT}")
    return out


def _find_cifar(root: Path) -> Path:
    """The batches folder or tar.gz that `root` names or contains."""
    if root.is_file():
        return root
    if root.is_dir():
        if (root / CIFAR_DIR).is_dir():
            return root / CIFAR_DIR
        if root.name == CIFAR_DIR or (root / "batches.meta").is_file():
            return root
        if (root / CIFAR_TAR).is_file():
            return root / CIFAR_TAR
        raise DatasetError(f"{root}: no CIFAR-10 data found; {_CIFAR_LAYOUT}")
    raise DatasetError(f"{root}: no such file or folder; {_CIFAR_LAYOUT}")


def load_cifar10(root: str | Path, split: Literal["train", "test"]) -> ImageDataset:
    """CIFAR-10 from the official python layout: train = data_batch_1..5 in order, test = test_batch."""
    if split not in _CIFAR_SPLITS:
        raise ValueError(f"CIFAR-10 split must be one of {sorted(_CIFAR_SPLITS)}, got {split!r}")
    source = _find_cifar(Path(root))
    members = ["batches.meta", *_CIFAR_SPLITS[split]]
    if source.is_file():
        dicts, where = _read_cifar_tar(source, members), f"{source}:{CIFAR_DIR}/"
    else:
        dicts, where = _read_cifar_dir(source, members), f"{source}/"
    classes = _parse_meta(dicts["batches.meta"], where + "batches.meta")
    parts = [_parse_batch(dicts[m], where + m, len(classes)) for m in _CIFAR_SPLITS[split]]
    images = np.concatenate([x for x, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    return ImageDataset(images, labels, classes, "cifar10")


# ---------------------------------------------------------------- STL-10 (binary)

STL_DIR = "stl10_binary"
_STL_SPLITS = ("train", "test", "unlabeled")
_STL_HW = 96
_STL_LAYOUT = (
    f"expected {STL_DIR}/ (or a folder containing it) with class_names.txt, train_X.bin/train_y.bin, "
    "test_X.bin/test_y.bin and unlabeled_X.bin (X: uint8 N x 3 x 96 x 96 column-major, y: uint8 labels 1..10)"
)


def _find_stl(root: Path) -> Path:
    if (root / STL_DIR).is_dir():
        return root / STL_DIR
    if root.is_dir():
        return root
    raise DatasetError(f"{root}: no such folder; {_STL_LAYOUT}")


def load_stl10(root: str | Path, split: Literal["train", "test", "unlabeled"]) -> ImageDataset:
    """STL-10 from the official binaries; unlabeled images get label -1.

    The 100,000 unlabeled images take 2.7 GB once decoded.
    """
    if split not in _STL_SPLITS:
        raise ValueError(f"STL-10 split must be one of {list(_STL_SPLITS)}, got {split!r}")
    folder = _find_stl(Path(root))
    names_path = folder / "class_names.txt"
    if not names_path.is_file():
        raise DatasetError(f"{names_path}: file not found; {_STL_LAYOUT}")
    classes = tuple(line.strip() for line in names_path.read_text().splitlines() if line.strip())
    if not classes:
        raise DatasetError(f"{names_path}: no class names; {_STL_LAYOUT}")

    x_path = folder / f"{split}_X.bin"
    if not x_path.is_file():
        raise DatasetError(f"{x_path}: file not found; {_STL_LAYOUT}")
    per_image = 3 * _STL_HW * _STL_HW
    size = x_path.stat().st_size
    if size == 0 or size % per_image:
        raise DatasetError(f"{x_path}: {size} bytes is not a whole number of {per_image}-byte images; {_STL_LAYOUT}")
    raw = np.memmap(x_path, dtype=np.uint8, mode="r")
    # each image is 3 channel planes stored column-major: [n, c, x, y] -> [n, y, x, c]
    images = np.ascontiguousarray(raw.reshape(-1, 3, _STL_HW, _STL_HW).transpose(0, 3, 2, 1))
    del raw

    if split == "unlabeled":
        return ImageDataset(images, np.full(len(images), -1, dtype=np.int64), classes, "stl10")
    y_path = folder / f"{split}_y.bin"
    if not y_path.is_file():
        raise DatasetError(f"{y_path}: file not found; {_STL_LAYOUT}")
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1  # stored 1..10
    if len(labels) != len(images):
        raise DatasetError(f"{y_path}: {len(labels)} labels for {len(images)} images in {x_path}; {_STL_LAYOUT}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DatasetError(f"{y_path}: labels outside 1..{len(classes)}; {_STL_LAYOUT}")
    return ImageDataset(images, labels, classes, "stl10")


# ---------------------------------------------------------------- image folder

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
_FOLDER_LAYOUT = f"expected root/<class>/<image> with images ending in {', '.join(sorted(IMAGE_SUFFIXES))}"


def load_image_folder(root: str | Path, size: int | None = None) -> ImageDataset:
    """Images under root/<class>/, classes sorted by folder name, converted to RGB.

    With `size=None` all images must share one size (so nothing is silently rescaled); otherwise each
    is resized to size x size with bilinear filtering.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; {_FOLDER_LAYOUT}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"{root}: no class folders; {_FOLDER_LAYOUT}")
    images: list[np.ndarray] = []
    labels: list[int] = []
    first: Path | None = None  # the image whose size every other must match
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p
            for p in class_dir.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise DatasetError(f"{class_dir}: class folder holds no images; {_FOLDER_LAYOUT}")
        for path in files:
            img = _read_image(path, size)
            if first is None:
                first = path
            elif img.shape != images[0].shape:
                raise DatasetError(
                    f"{path}: size {img.shape[1]}x{img.shape[0]} differs from {images[0].shape[1]}x"
                    f"{images[0].shape[0]} of {first}: all images of a folder must share one size (it becomes "
                    "the model's input size); resize them first"
                )
            images.append(img)
            labels.append(label)
    return ImageDataset(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(p.name for p in class_dirs),
                        "folder")


def _read_image(path: Path, size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable image ({e}); {_FOLDER_LAYOUT}") from e
    if size is not None:
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


# ---------------------------------------------------------------- dispatch


def _kind(root: Path) -> Literal["cifar10", "stl10", "folder"]:
    """Which official layout `root` holds (by its files; nothing is read)."""
    if root.is_file() or root.name == CIFAR_DIR or any((root / n).exists() for n in (CIFAR_DIR, CIFAR_TAR,
                                                                                      "batches.meta")):
        return "cifar10"
    if root.name == STL_DIR or (root / STL_DIR).is_dir() or (root / "class_names.txt").is_file():
        return "stl10"
    return "folder"


def load_dataset(spec: str | Path, split: str = "train") -> ImageDataset:
    """Load whatever official layout is at `spec`: CIFAR-10 folder or tar.gz, STL-10 binaries, image folder.

    An image folder may hold one sub-folder per split (root/train/<class>/...); without one, the folder
    itself is the training split and other splits are an error (never silently the training images).
    """
    root = Path(spec)
    if not root.exists():
        raise DatasetError(
            f"{root}: no such file or folder; expected a CIFAR-10 folder or {CIFAR_TAR}, "
            f"an {STL_DIR}/ folder, or an image folder (root/<class>/<image>)"
        )
    kind = _kind(root)
    if kind == "cifar10":
        return load_cifar10(root, split)  # type: ignore[arg-type]  # bad splits raise there
    if kind == "stl10":
        return load_stl10(root, split)  # type: ignore[arg-type]
    if (root / split).is_dir():
        return load_image_folder(root / split)
    if split != "train":
        raise DatasetError(f"{root}: no {split!r} folder; {_FOLDER_LAYOUT}, or root/{split}/<class>/<image>")
    return load_image_folder(root)


def has_test_split(spec: str | Path) -> bool:
    """Whether `spec` has a test split: CIFAR-10 and STL-10 always do, an image folder only with root/test/.

    Without one, evaluation reports on the validation split (and says so) instead of failing."""
    kind = _kind(Path(spec))
    return kind != "folder" or (Path(spec) / "test").is_dir()
