"""Loaders read tiny files written here in the exact official layouts, and refuse malformed ones."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (
    CIFAR_VAL_SIZE,
    DatasetError,
    ImageDataset,
    SplitSpec,
    has_test_split,
    load_cifar10,
    load_dataset,
    load_image_folder,
    load_split,
    load_stl10,
    train_val_split,
    validation_split,
)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_BATCH = 3  # images per CIFAR batch here; the official files hold 10,000


# ---------------------------------------------------------------- CIFAR writers


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes bytes/str as Python 2 `str` opcodes, like the official files.

    Python 3's own protocol 2 would write bytes as `_codecs.encode(...)` calls, which the originals
    (pickled by Python 2) never contain.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _py2_pickle(obj: object, path: Path) -> None:
    with path.open("wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _to_rows(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 32, 32, 3] -> [n, 3072]: R, G, B planes, each 32x32 row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _cifar_images(seed: int, n: int = PER_BATCH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _write_cifar(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write folder/cifar-10-batches-py/; return (train images, train labels, test images, test labels)."""
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    _py2_pickle(
        {b"num_cases_per_batch": PER_BATCH, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072},
        d / "batches.meta",
    )
    xs, ys = [], []
    for k in range(6):
        x = _cifar_images(k)
        y = [(k * PER_BATCH + i) % 10 for i in range(PER_BATCH)]
        name, label = (f"data_batch_{k + 1}", f"training batch {k + 1} of 5") if k < 5 else ("test_batch", "x")
        batch = {
            b"batch_label": label.encode(),
            b"labels": y,
            b"data": _to_rows(x),
            b"filenames": [f"img_{k}_{i}.png".encode() for i in range(PER_BATCH)],
        }
        _py2_pickle(batch, d / name)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], np.asarray(ys[5])


def _tar(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return dest


@pytest.fixture
def cifar(tmp_path: Path) -> tuple[Path, tuple[np.ndarray, ...]]:
    return tmp_path, _write_cifar(tmp_path)


# ---------------------------------------------------------------- CIFAR


def test_cifar_pickle_has_official_opcodes(cifar: tuple[Path, tuple[np.ndarray, ...]]) -> None:
    raw = (cifar[0] / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert raw.startswith(b"\x80\x02}") and b"U\x04data" in raw and b"_codecs" not in raw


def test_cifar_pixel_layout_channel_order_and_orientation(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    _py2_pickle({b"label_names": [c.encode() for c in CLASSES]}, d / "batches.meta")
    row = np.zeros((1, 3072), np.uint8)
    row[0, 1] = 10  # R at y=0, x=1
    row[0, 32] = 20  # R at y=1, x=0
    row[0, 1024 + 2] = 30  # G at y=0, x=2
    row[0, 2048 + 31 * 32 + 5] = 40  # B at y=31, x=5
    _py2_pickle({b"labels": [7], b"data": row}, d / "test_batch")
    ds = load_cifar10(tmp_path, "test")
    expected = np.zeros((1, 32, 32, 3), np.uint8)
    expected[0, 0, 1, 0], expected[0, 1, 0, 0], expected[0, 0, 2, 1], expected[0, 31, 5, 2] = 10, 20, 30, 40
    np.testing.assert_array_equal(ds.images, expected)
    assert ds.labels.tolist() == [7]


@pytest.mark.parametrize("where", ["parent", "batches_dir", "tar", "tar_parent"])
def test_cifar_every_root_form(cifar: tuple[Path, tuple[np.ndarray, ...]], tmp_path: Path, where: str) -> None:
    folder, (x_train, y_train, x_test, y_test) = cifar
    archive = tmp_path / "archive"  # the tar alone in its folder, away from the extracted batches
    archive.mkdir()
    tar = _tar(folder, archive / "cifar-10-python.tar.gz")
    root = {"parent": folder, "batches_dir": folder / "cifar-10-batches-py", "tar": tar, "tar_parent": archive}[where]
    for load in (load_cifar10, load_dataset):
        train, test = load(root, "train"), load(root, "test")
        assert train.images.dtype == np.uint8 and train.images.shape == (5 * PER_BATCH, 32, 32, 3)
        np.testing.assert_array_equal(train.images, x_train)
        np.testing.assert_array_equal(test.images, x_test)
        assert train.labels.dtype == np.int64
        np.testing.assert_array_equal(train.labels, y_train)
        np.testing.assert_array_equal(test.labels, y_test)
        assert train.classes == test.classes == CLASSES


def test_cifar_rejects_unknown_split(cifar: tuple[Path, tuple[np.ndarray, ...]]) -> None:
    with pytest.raises(ValueError, match="split"):
        load_cifar10(cifar[0], "val")  # type: ignore[arg-type]


def test_cifar_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope.*cifar-10-batches-py"):
        load_cifar10(tmp_path / "nope", "train")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path))):
        load_cifar10(tmp_path, "train")  # empty folder


def test_cifar_missing_batch(cifar: tuple[Path, tuple[np.ndarray, ...]]) -> None:
    (cifar[0] / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"data_batch_3: file not found.*expected"):
        load_cifar10(cifar[0], "train")
    assert len(load_cifar10(cifar[0], "test")) == PER_BATCH  # other split unaffected


def test_cifar_truncated_batch(cifar: tuple[Path, tuple[np.ndarray, ...]]) -> None:
    path = cifar[0] / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DatasetError, match="test_batch: not a readable CIFAR-10 pickle"):
        load_cifar10(cifar[0], "test")


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({b"labels": [0, 1], b"data": np.zeros((2, 3071), np.uint8)}, r"expected uint8 \[n, 3072\]"),
        ({b"labels": [0, 1], b"data": np.zeros((2, 3072), np.float32)}, r"expected uint8 \[n, 3072\]"),
        ({b"labels": [0, 1, 2], b"data": np.zeros((2, 3072), np.uint8)}, "3 labels for 2 images"),
        ({b"labels": [0, 10], b"data": np.zeros((2, 3072), np.uint8)}, r"labels outside \[0, 10\)"),
        ({b"labels": [0, 1]}, "missing b'data'"),
        ([1, 2, 3], "expected a pickled dict"),
    ],
    ids=["short_rows", "float_data", "label_count", "label_range", "no_data", "not_dict"],
)
def test_cifar_malformed_batch(cifar: tuple[Path, tuple[np.ndarray, ...]], batch: object, match: str) -> None:
    path = cifar[0] / "cifar-10-batches-py" / "test_batch"
    _py2_pickle(batch, path)
    with pytest.raises(DatasetError, match=match) as err:
        load_cifar10(cifar[0], "test")
    assert str(path) in str(err.value)


class _Evil:
    def __init__(self, call: object, arg: str) -> None:
        self.call, self.arg = call, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return self.call, (self.arg,)


@pytest.mark.parametrize("call", ["os.system", "builtins.eval"])
def test_cifar_refuses_malicious_pickle_without_running_it(
    cifar: tuple[Path, tuple[np.ndarray, ...]], call: str
) -> None:
    marker = cifar[0] / "pwned"
    arg = f"touch {marker}" if call == "os.system" else f"open({str(marker)!r}, 'w')"
    payload = _Evil(os.system if call == "os.system" else eval, arg)
    path = cifar[0] / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({b"labels": [0], b"data": payload}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to unpickle") as err:
        load_cifar10(cifar[0], "train")
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_cifar_tar_missing_member_and_corrupt_archive(
    cifar: tuple[Path, tuple[np.ndarray, ...]], tmp_path: Path
) -> None:
    (cifar[0] / "cifar-10-batches-py" / "data_batch_5").unlink()
    tar = _tar(cifar[0], tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz: archive lacks cifar-10-batches-py/data_batch_5"):
        load_cifar10(tar, "train")
    assert len(load_cifar10(tar, "test")) == PER_BATCH
    tar.write_bytes(tar.read_bytes()[:300])
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz: not a readable tar archive"):
        load_cifar10(tar, "test")
    tar.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz"):
        load_dataset(tar, "test")


# ---------------------------------------------------------------- STL-10

STL_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def _stl_bytes(images: np.ndarray) -> bytes:
    """uint8 [n, 96, 96, 3] -> official bytes: per image 3 planes, each column-major (y varies fastest)."""
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def _write_stl(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    (d / "class_names.txt").write_text("\n".join(STL_CLASSES) + "\n")
    rng = np.random.default_rng(1)
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for split, n in [("train", 3), ("test", 2), ("unlabeled", 2)]:
        x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        (d / f"{split}_X.bin").write_bytes(_stl_bytes(x))
        y = None
        if split != "unlabeled":
            y = rng.integers(0, 10, n)
            (d / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
        out[split] = (x, y)
    return out


def test_stl_pixel_layout_is_column_major(tmp_path: Path) -> None:
    d = tmp_path / "stl10_binary"
    d.mkdir()
    (d / "class_names.txt").write_text("\n".join(STL_CLASSES))
    raw = np.zeros(3 * 96 * 96, np.uint8)
    raw[1] = 10  # R at y=1, x=0 (column-major: y changes fastest)
    raw[96] = 20  # R at y=0, x=1
    raw[96 * 96 + 96 * 3 + 2] = 30  # G at y=2, x=3
    (d / "test_X.bin").write_bytes(raw.tobytes())
    (d / "test_y.bin").write_bytes(bytes([10]))
    ds = load_stl10(d, "test")
    expected = np.zeros((1, 96, 96, 3), np.uint8)
    expected[0, 1, 0, 0], expected[0, 0, 1, 0], expected[0, 2, 3, 1] = 10, 20, 30
    np.testing.assert_array_equal(ds.images, expected)
    assert ds.labels.tolist() == [9] and ds.classes == STL_CLASSES


@pytest.mark.parametrize("inner", [False, True], ids=["parent", "stl10_binary"])
def test_stl_splits(tmp_path: Path, inner: bool) -> None:
    written = _write_stl(tmp_path)
    root = tmp_path / "stl10_binary" if inner else tmp_path
    for split, (x, y) in written.items():
        for ds in (load_stl10(root, split), load_dataset(root, split)):  # type: ignore[arg-type]
            np.testing.assert_array_equal(ds.images, x)
            assert ds.labels.dtype == np.int64 and ds.classes == STL_CLASSES
            expected = np.full(len(x), -1) if y is None else y
            np.testing.assert_array_equal(ds.labels, expected)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda d: (d / "train_X.bin").write_bytes(b"\0" * 100), r"train_X.bin: 100 bytes"),
        (lambda d: (d / "train_y.bin").write_bytes(bytes([1, 2])), r"train_y.bin: 2 labels for 3 images"),
        (lambda d: (d / "train_y.bin").write_bytes(bytes([0, 1, 2])), r"train_y.bin: labels outside 1..10"),
        (lambda d: (d / "train_y.bin").unlink(), r"train_y.bin: file not found"),
        (lambda d: (d / "train_X.bin").unlink(), r"train_X.bin: file not found"),
        (lambda d: (d / "class_names.txt").unlink(), r"class_names.txt: file not found"),
    ],
    ids=["x_size", "label_count", "label_range", "no_y", "no_x", "no_class_names"],
)
def test_stl_malformed(tmp_path: Path, corrupt: Callable[[Path], object], match: str) -> None:
    _write_stl(tmp_path)
    corrupt(tmp_path / "stl10_binary")
    with pytest.raises(DatasetError, match=match) as err:
        load_stl10(tmp_path, "train")
    assert str(tmp_path / "stl10_binary") in str(err.value) and "stl10_binary/" in str(err.value)


# ---------------------------------------------------------------- image folder


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_image_folder_png_jpg_and_gray(tmp_path: Path) -> None:
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat").mkdir()
    a, b = _pattern(8, 6, 0), _pattern(8, 6, 1)  # non-square: a transposed read changes the shape
    Image.fromarray(a).save(tmp_path / "cat" / "a.png")
    Image.fromarray(b).save(tmp_path / "dog" / "b.PNG")
    gray = np.arange(48, dtype=np.uint8).reshape(8, 6)
    Image.fromarray(gray, mode="L").save(tmp_path / "dog" / "c.png")
    smooth = np.zeros((8, 6, 3), np.uint8)
    smooth[..., 0], smooth[..., 2] = 200, 50  # flat colour: JPEG keeps it within a few levels
    Image.fromarray(smooth).save(tmp_path / "cat" / "d.jpg", quality=95)
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path)
    assert ds.classes == ("cat", "dog") and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images.shape == (4, 8, 6, 3) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images[0], a)
    np.testing.assert_array_equal(ds.images[2], b)
    np.testing.assert_array_equal(ds.images[3], np.repeat(gray[..., None], 3, axis=2))
    assert np.abs(ds.images[1].astype(int) - smooth).max() <= 3
    np.testing.assert_array_equal(load_dataset(tmp_path).images, ds.images)


def test_image_folder_sizes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    Image.fromarray(_pattern(8, 8, 0)).save(tmp_path / "a" / "1.png")
    Image.fromarray(_pattern(4, 8, 1)).save(tmp_path / "a" / "2.png")
    with pytest.raises(DatasetError, match=r"2.png: size 8x4 differs from 8x8 of .*1.png: all images of a folder"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, size=5).images.shape == (2, 5, 5, 3)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="missing: no such folder"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(DatasetError, match=f"{re.escape(str(tmp_path))}: no class folders"):
        load_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: class folder holds no images"):
        load_image_folder(tmp_path)
    (tmp_path / "empty" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"bad\.png: not a readable image"):
        load_image_folder(tmp_path)


def test_load_dataset_split_folders(tmp_path: Path) -> None:
    for split, seed in [("train", 0), ("test", 1)]:
        (tmp_path / split / "x").mkdir(parents=True)
        Image.fromarray(_pattern(4, 4, seed)).save(tmp_path / split / "x" / "1.png")
    np.testing.assert_array_equal(load_dataset(tmp_path, "test").images[0], _pattern(4, 4, 1))
    np.testing.assert_array_equal(load_dataset(tmp_path, "train").images[0], _pattern(4, 4, 0))
    single = tmp_path / "train"
    with pytest.raises(DatasetError, match="no 'test' folder"):  # never the training images instead
        load_dataset(single, "test")
    with pytest.raises(DatasetError, match="nothing-here: no such file or folder"):
        load_dataset(tmp_path / "nothing-here")


# ---------------------------------------------------------------- ImageDataset, split


def _tiny(n: int) -> ImageDataset:
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    return ImageDataset(images, np.arange(n, dtype=np.int64) % 3, ("a", "b", "c"))


def test_subset_and_validation() -> None:
    ds = _tiny(6)
    assert len(ds) == 6
    sub = ds.subset(np.array([4, 1]))
    assert sub.labels.tolist() == [1, 1] and sub.images[:, 0, 0, 0].tolist() == [4, 1] and sub.classes == ds.classes
    assert len(ds.subset(slice(2, 5))) == 3
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(ds.images.astype(np.float32), ds.labels, ds.classes)
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(ds.images, ds.labels[:-1], ds.classes)


def test_train_val_split_holds_out_the_last_images() -> None:
    train, val = train_val_split(_tiny(10), val_size=3)
    assert train.images[:, 0, 0, 0].tolist() == list(range(7))
    assert val.images[:, 0, 0, 0].tolist() == [7, 8, 9]
    for bad in (0, 10, 11):
        with pytest.raises(ValueError, match="val_size"):
            train_val_split(_tiny(10), val_size=bad)


def _classes(counts: list[int], kind: str = "folder") -> ImageDataset:
    """Class-sorted images (as a folder loads them); pixel value = original index, to trace the split."""
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    images = (np.arange(len(labels)) % 256).astype(np.uint8)[:, None, None, None] * np.ones((1, 1, 1, 3), np.uint8)
    ds = ImageDataset(images, labels, tuple(f"c{i}" for i in range(len(counts))), kind)
    return ds


def _index(ds: ImageDataset) -> list[int]:
    return ds.images[:, 0, 0, 0].astype(int).tolist()


def test_cifar_keeps_its_documented_split_bit_for_bit() -> None:
    """The shipped models' bank (45,000) and calibration split (45000..49999) depend on this: never stratified."""
    n = 50_000
    images = np.random.default_rng(0).integers(0, 256, (n, 1, 1, 3), dtype=np.uint8)
    labels = np.random.default_rng(1).integers(0, 10, n).astype(np.int64)
    ds = ImageDataset(images, labels, CLASSES, "cifar10")
    shipped = json.loads(Path("artifacts/default/manifest.json").read_text())["training"]["hyperparameters"]
    for spec in (SplitSpec(), SplitSpec.from_config(shipped), SplitSpec(val_seed=7, val_fraction=0.3)):
        train, val = spec.apply(ds)
        assert val is not None and len(val) == CIFAR_VAL_SIZE == 5000
        np.testing.assert_array_equal(train.images, images[:45_000])
        np.testing.assert_array_equal(train.labels, labels[:45_000])
        np.testing.assert_array_equal(val.images, images[45_000:])
        np.testing.assert_array_equal(val.labels, labels[45_000:])
        assert np.shares_memory(train.images, images) and np.shares_memory(val.images, images)  # views, as before
        assert spec.describe(ds) == "training images 45000..49999 (held out of the bank; the validation split)"
    train, val = validation_split(ds, 100)  # an explicit size is still the tail
    assert val is not None and _index(val) == _index(ds.subset(slice(n - 100, None)))


def test_loaders_tag_their_kind(cifar: tuple[Path, tuple[np.ndarray, ...]], tmp_path: Path) -> None:
    tar = _tar(cifar[0], tmp_path / "cifar-10-python.tar.gz")
    assert load_dataset(cifar[0]).kind == load_dataset(tar).kind == "cifar10"
    assert load_dataset(cifar[0]).subset(np.array([0])).kind == "cifar10"
    stl = tmp_path / "stl"
    _write_stl(stl)
    assert load_dataset(stl).kind == "stl10" and has_test_split(stl) and has_test_split(cifar[0])
    (tmp_path / "f" / "a").mkdir(parents=True)
    Image.fromarray(_pattern(4, 4, 0)).save(tmp_path / "f" / "a" / "1.png")
    assert load_dataset(tmp_path / "f").kind == "folder" and not has_test_split(tmp_path / "f")


@pytest.mark.parametrize("kind", ["folder", "stl10", "arrays"])
def test_stratified_split_holds_out_every_class(kind: str) -> None:
    ds = _classes([60, 60, 60], kind)  # the 3-class folder, sorted by class
    train, val = validation_split(ds)
    assert val is not None and np.bincount(val.labels).tolist() == [6, 6, 6]
    assert np.bincount(train.labels).tolist() == [54, 54, 54]
    assert sorted(_index(train) + _index(val)) == list(range(180))  # a partition
    assert _index(train) == sorted(_index(train))  # training keeps the file order
    assert len(set(val.labels[:6].tolist())) > 1  # validation is shuffled: a prefix mixes classes
    again, other = validation_split(ds)[1], validation_split(ds, seed=1)[1]
    assert again is not None and other is not None
    assert _index(again) == _index(val) and _index(other) != _index(val)  # seeded


def test_stratified_split_sizes() -> None:
    ds = _classes([100, 10, 2])
    val = validation_split(ds)[1]
    assert val is not None and np.bincount(val.labels).tolist() == [10, 1, 1]  # 10 %, at least one each
    val = validation_split(ds, fraction=0.25)[1]
    assert val is not None and np.bincount(val.labels).tolist() == [25, 2, 1]  # round(0.5) = 0 -> the minimum 1
    val = validation_split(ds, 23)[1]  # one each, the other 20 in proportion to the class sizes
    assert val is not None and len(val) == 23 and np.bincount(val.labels).tolist() == [19, 3, 1]
    assert validation_split(ds, 0) == (ds, None)


def test_stratified_split_errors_name_the_class() -> None:
    with pytest.raises(DatasetError, match=r"class 'c1' has 1 image\(s\): too few .* --val-size 0"):
        validation_split(_classes([10, 1, 5]))
    assert validation_split(_classes([10, 1, 5]), 0)[1] is None
    with pytest.raises(DatasetError, match=r"val_size 5000 does not fit 180 labelled images in 3 classes"):
        validation_split(_classes([60, 60, 60]), 5000)  # the first failure, now a clear sentence
    with pytest.raises(DatasetError, match="val_size 2 does not fit"):
        validation_split(_classes([60, 60, 60]), 2)
    with pytest.raises(ValueError, match="val_fraction"):
        validation_split(_classes([60, 60]), fraction=1.0)


def test_split_spec_round_trips_a_training_config(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(_pattern(4, 4, i)).save(tmp_path / c / f"{i}.png")
    spec = SplitSpec.from_config({"val_size": None, "val_fraction": 0.2, "val_seed": 3, "limit": None, "lr": 1})
    assert spec == SplitSpec(val_fraction=0.2, val_seed=3)
    train, val = load_split(tmp_path, spec)
    assert val is not None and len(train) == 16 and np.bincount(val.labels).tolist() == [2, 2]
    assert SplitSpec.from_config({}) == SplitSpec()  # old checkpoints: the kind's default
    assert "stratified: 20% of each class" in spec.describe(train)
