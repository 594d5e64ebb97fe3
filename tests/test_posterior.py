import json

import pytest
import torch
from helpers import random_models

from varmerge import files
from varmerge.posterior import DiagonalGaussian, FullGaussian, MixtureGaussian, PosteriorMeta, load_posterior


def diag(seed=0, task="t0"):
    m, p = random_models(1, seed=seed, dtype=torch.float32)
    return DiagonalGaussian(
        m[0], p[0], PosteriorMeta(task=task, optimizer="ivon", seed=seed, ess=100.0, weight_decay=1e-4)
    )


def test_diagonal_round_trip(tmp_path):
    post = diag()
    digest = post.save(tmp_path / "p.safetensors")
    back = DiagonalGaussian.load(tmp_path / "p.safetensors", expected=post.mean)
    assert back.meta == post.meta and len(digest) == 64
    for k in post.mean:
        assert torch.equal(back.mean[k], post.mean[k]) and torch.equal(back.precision[k], post.precision[k])
    assert isinstance(load_posterior(tmp_path / "p.safetensors"), DiagonalGaussian)


def test_mixture_round_trip(tmp_path):
    mix = MixtureGaussian([diag(1), diag(2), diag(3)], meta=PosteriorMeta(task="t1", optimizer="multi_ivon"))
    mix.save(tmp_path / "m.safetensors")
    back = load_posterior(tmp_path / "m.safetensors")
    assert isinstance(back, MixtureGaussian) and back.K == 3
    assert back.weights == pytest.approx([1 / 3] * 3)
    assert back.components[2].meta.seed == 3
    for a, b in zip(mix.means, back.means):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_full_round_trip(tmp_path):
    P = 4 * 3 + 4
    post = FullGaussian(
        torch.randn(P, dtype=torch.float64),
        torch.eye(P, dtype=torch.float64) * 2,
        {"weight": (4, 3), "bias": (4,)},
        PosteriorMeta(optimizer="full_von"),
    )
    post.save(tmp_path / "f.safetensors")
    back = load_posterior(tmp_path / "f.safetensors", expected={"weight": (4, 3), "bias": (4,)})
    assert torch.equal(back.mean, post.mean) and back.shapes == post.shapes
    sd = back.state_dict()
    assert sd["weight"].shape == (4, 3)
    assert back.diagonal().precision["bias"].eq(2).all()


def test_file_from_another_model_is_refused(tmp_path):
    post = diag()
    post.save(tmp_path / "p.safetensors")
    other = {k: v for k, v in post.mean.items() if k != "head"}
    with pytest.raises(ValueError, match="does not belong to this model.*head"):
        DiagonalGaussian.load(tmp_path / "p.safetensors", expected=other)
    reshaped = dict(post.mean, head=torch.zeros(6))
    with pytest.raises(ValueError, match="'head' has shape"):
        DiagonalGaussian.load(tmp_path / "p.safetensors", expected=reshaped)


def test_truncated_and_corrupted_files(tmp_path):
    path = tmp_path / "p.safetensors"
    diag().save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_posterior(tmp_path / "trunc.safetensors")
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # a byte inside the tensor data
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="content hash mismatch"):
        load_posterior(tmp_path / "flip.safetensors")
    with pytest.raises(ValueError, match="no such file"):
        load_posterior(tmp_path / "missing.safetensors")


def test_kind_mismatch_and_foreign_files(tmp_path):
    diag().save(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="not 'mixture'"):
        MixtureGaussian.load(tmp_path / "p.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="no 'varmerge' metadata"):
        load_posterior(tmp_path / "foreign.safetensors")


@pytest.mark.parametrize("value, match", [(float("nan"), "non-finite"), (-2.0, "negative")])
def test_bad_precision_rejected_on_construction_and_load(tmp_path, value, match):
    post = diag()
    bad = {k: v.clone() for k, v in post.precision.items()}
    bad["head"][0] = value
    with pytest.raises(ValueError, match=match):
        DiagonalGaussian(post.mean, bad)
    # a file whose hash is right but whose content is bad (written bypassing the container)
    tensors = {f"mean/{k}": v for k, v in post.mean.items()}
    tensors.update({f"precision/{k}": v for k, v in bad.items()})
    files.save_tensors(
        tmp_path / "bad.safetensors", tensors, {"kind": "diagonal", "meta": {}, "names": list(post.mean)}
    )
    with pytest.raises(ValueError, match=match):
        load_posterior(tmp_path / "bad.safetensors")


def test_mixture_components_must_match():
    a, b = diag(1), diag(2)
    b.mean.pop("head")
    b.precision.pop("head")
    with pytest.raises(ValueError, match="component 1"):
        MixtureGaussian([a, b])
    with pytest.raises(ValueError, match="weights"):
        MixtureGaussian([diag(1), diag(2)], weights=[0.9, 0.2])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(ValueError):
        files.save_tensors(tmp_path / "x.safetensors", {})
    with pytest.raises(RuntimeError):
        files.atomic_write(tmp_path / "y.bin", lambda tmp: (_ for _ in ()).throw(RuntimeError("boom")))
    assert list(tmp_path.iterdir()) == []


def test_metadata_is_json(tmp_path):
    diag().save(tmp_path / "p.safetensors")
    _, header = files.load_tensors(tmp_path / "p.safetensors")
    assert json.loads(json.dumps(header))["meta"]["optimizer"] == "ivon"
