"""The experiment schema: every shipped config validates; bad configs fail with one clear message."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from varmerge.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
GOOD = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "params.yaml"])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert len(cfg.data.tasks) >= 2


def with_(path, value):
    d = yaml.safe_load(yaml.safe_dump(GOOD))
    node = d
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return d


@pytest.mark.parametrize(
    "data, match",
    [
        (with_("data.bogus", 1), "data.bogus: unknown key"),
        (with_("posterior.steps", "many"), "posterior.steps"),
        (with_("merge.spacing", 0.3), "does not divide 1"),
        (with_("data.tasks", [{"name": "a", "classes": [0]}]), "at least 2 tasks"),
        (with_("data.tasks", [{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [1]}]), "class 1 is in both"),
        (with_("data.tasks", [{"name": "a", "classes": [0]}, {"name": "a", "classes": [1]}]), "unique"),
        (with_("merge.methods", ["simple", "nope"]), "unknown merge methods"),
        (with_("posterior.method", "ivon"), "mixture posterior"),
        (with_("selection.constraints", [{"task": "zzz", "value": 0.9}]), "names task 'zzz'"),
        (with_("posterior.components", 1), "multi_ivon needs components >= 2"),
        (with_("runner", {"workers": 2}), "runner.workers needs runner.kind dask"),
        (with_("runner", {"kind": "dask", "address": "tcp://h:1", "workers": 2}), "with runner.address the"),
        (with_("runner", {"kind": "dask", "address": "127.0.0.1:8786"}), "is not a Dask scheduler address"),
        (with_("runner", {"kind": "ray"}), "runner.kind"),
        (with_("runner", {"kind": "dask", "workers": 0}), "runner.workers"),
    ],
)
def test_bad_configs(data, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(data, "test.yaml")


def test_cli_validate_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_("merge.spacing", 0.3)))
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "does not divide 1" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == [bad]  # nothing written
    ok = CliRunner().invoke(app, ["validate", str(ROOT / "configs" / "smoke.yaml")])
    assert ok.exit_code == 0 and "68 points" in ok.output  # 66 of spacing 0.1, uniform and temperature α
    missing = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "no such config file" in missing.output


def test_gpu_requested_without_one_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text(yaml.safe_dump({**GOOD, "accelerator": "gpu"}))
    result = CliRunner().invoke(app, ["run", str(cfg), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no CUDA device is visible" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_validate_says_how_alpha_is_chosen_and_where_tasks_run(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["selection"] = {"method": "hessian", "strategy": "closed_loop", "budget": 4, "batch": 2}
    cfg["runner"] = {"kind": "dask", "workers": 3}
    path = tmp_path / "closed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = CliRunner().invoke(app, ["validate", str(path), "--schema-only"]).output
    out = " ".join(out.replace("│", " ").split())  # the table wraps its cells
    assert "closed loop: up to 4 multitask finetunes, first at pooled and uniform α, then 2 at a time" in out, out
    assert "merged fronts (simple, hessian, mixture)" in out and "selection method hessian: selection.method" in out
    assert "a local Dask cluster of 3 workers" in out, out
    del cfg["selection"], cfg["runner"]
    path.write_text(yaml.safe_dump(cfg))
    plain = CliRunner().invoke(app, ["validate", str(path), "--schema-only"]).output
    plain = " ".join(plain.replace("│", " ").split())
    assert "closed loop: up to 3 multitask finetunes, first at pooled and uniform α" in plain, plain
    assert "(the default strategy: on the benchmark columns of docs/RESULTS.md" in plain
    assert "selection method mixture: the last of merge.methods" in plain
    assert "the flow's thread" in plain and "objective mean accuracy; verdict margin 0.5 points" in plain, plain


def test_relative_paths_in_a_config_are_read_from_its_folder(tmp_path, monkeypatch):
    from varmerge.config import load_config

    folder = tmp_path / "project"
    folder.mkdir()
    raw = {
        "name": "own",
        "data": {
            "source": "files",
            "options": {"train": {"a": "data/a.csv", "b": "/abs/b.csv"}, "test": "data/test.csv"},
            "tasks": [{"name": "a", "domain": "a"}, {"name": "b", "domain": "b"}],
        },
        "model": {"name": "hf_text", "options": {"model_path": "../models/bert"}},
        "base": {"checkpoint": "~/theta.safetensors"},
        "merge": {"methods": ["simple", "hessian"]},
        "selection": {"method": "hessian"},
    }
    (folder / "own.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # somewhere else than the config's folder
    cfg = load_config("project/own.yaml")
    assert cfg.data.options["train"] == {"a": str(folder / "data" / "a.csv"), "b": "/abs/b.csv"}
    assert cfg.data.options["test"] == str(folder / "data" / "test.csv")
    assert cfg.model.options["model_path"] == str(tmp_path / "models" / "bert")
    assert cfg.base.checkpoint == str(Path("~/theta.safetensors").expanduser())


def test_two_config_files_with_one_name_do_not_overwrite_each_other(tmp_path):
    """The run folder records the config file that wrote it."""
    import copy
    import json

    from helpers import TINY

    from varmerge.preflight import PreflightError, preflight

    first, second = tmp_path / "a" / "own.yaml", tmp_path / "b" / "own.yaml"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text(yaml.safe_dump(copy.deepcopy(TINY)))
    out = tmp_path / "runs"
    plan = preflight(load_config(first), output_dir=out, config_file=first)
    assert plan.config_file == str(first.resolve())
    plan.run_dir.mkdir(parents=True)
    from flows.front import portable  # front.json as a run writes it (the config file relative to it)

    front = portable({"config_file": plan.config_file, "tracking_uri": plan.tracking_uri}, plan.run_dir)
    assert not Path(front["config_file"]).is_absolute()
    (plan.run_dir / "front.json").write_text(json.dumps(front))
    assert preflight(load_config(first), output_dir=out, config_file=first).run_dir == plan.run_dir  # a rerun
    with pytest.raises(PreflightError, match=r"holds the run of .*a/own.yaml; .*b/own.yaml has the same name 'tiny'"):
        preflight(load_config(second), output_dir=out, config_file=second)
