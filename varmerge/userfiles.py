"""The user's own files, checked with pandas and the standard library alone: a config's common
mistakes (a missing, empty or unreadable data file, a missing column, a label outside ``labels``,
a task whose domain no row has, a model folder without a ``config.json``, a missing checkpoint)
answer in about a second, before torch, datasets or Lightning are imported.

:func:`read_table` and :func:`label_names` are also what :mod:`varmerge.data` reads the files
with, so both paths say the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

TABLE_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


def read_table(path: Path, where: str, columns: Sequence[str]) -> pd.DataFrame:
    """A local CSV / JSON Lines / Parquet file's ``columns``; one-line errors naming ``where``
    (the config option) and the file."""
    import pandas as pd

    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{where}: {path} is not a .csv, .jsonl or .parquet file")
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{where}: {path} is empty")
    try:
        if kind == "csv":
            frame = pd.read_csv(path, keep_default_na=False)
        elif kind == "json":
            frame = pd.read_json(path, lines=True)
        else:
            frame = pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise ValueError(f"{where}: cannot read {path} as {kind}: {' '.join(str(exc).split())}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        have = ", ".join(map(str, frame.columns))
        raise ValueError(f"{where}: {path} has no column {missing[0]!r} (columns: {have})")
    if frame.empty:
        raise ValueError(f"{where}: {path} has no rows")
    return frame[list(columns)]


def row_place(path: Path, i: int) -> str:
    """Where row ``i`` (0-based) of a table file is, as an editor shows it: a CSV's header is line
    1, JSON Lines start at line 1, a Parquet file has rows."""
    kind = TABLE_SUFFIXES[path.suffix.lower()]
    return f"line {i + 2}" if kind == "csv" else f"line {i + 1}" if kind == "json" else f"row {i + 1}"


def label_names(values: Sequence, labels: Sequence | None, where: str) -> list:
    """The class order: ``labels`` as given (2 or more distinct values), else the sorted distinct
    ``values``."""
    if labels is not None:
        labels = list(labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"{where}: labels must be 2 or more distinct values, got {labels}")
        return labels
    return sorted(set(values))


def check_labels(values: Sequence, names: Sequence, where: str, path: Path) -> None:
    """The first value of ``values`` (one file's labels) outside ``names`` is an error naming the
    file and its line."""
    known = set(names)
    for i, v in enumerate(values):
        if v not in known:
            raise ValueError(f"{where}: {path} {row_place(path, i)} has label {v!r}, not one of {list(names)}")


def check_model_folder(model_path: str | Path) -> Path:
    """``model_path`` as a local Hugging Face model folder (one with a ``config.json``), or a
    one-line error: only local weights are used."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model_path {str(model_path)!r} is not a local model folder with a config.json; "
            "only local weights are used (the Hugging Face hub is never contacted)"
        )
    return path


def _files(spec) -> list[tuple[str | None, Path]]:
    return [(d, Path(f)) for d, f in spec.items()] if isinstance(spec, dict) else [(None, Path(spec))]


def _section(raw: dict, *keys: str) -> dict:
    node = raw
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def check_config(raw: dict) -> None:
    """The quick checks of a config's own files (see the module docstring), on the raw config
    (a YAML mapping with its paths resolved: :func:`varmerge.config.read_config`), before the
    schema is validated (validation imports the merge rules, and torch); values of the wrong type
    are left to the schema. Raises ValueError or FileNotFoundError with one line."""
    model_path = _section(raw, "model", "options").get("model_path")
    if isinstance(model_path, str):
        check_model_folder(model_path)
    checkpoint = _section(raw, "base").get("checkpoint")
    if isinstance(checkpoint, str) and not Path(checkpoint).exists():
        raise FileNotFoundError(f"base.checkpoint {checkpoint}: no such file or folder")
    data = _section(raw, "data")
    if data.get("source") == "files":
        tasks = data.get("tasks") if isinstance(data.get("tasks"), list) else []
        _check_files(_section(data, "options"), [t for t in tasks if isinstance(t, dict)])


def _check_files(opts: dict, tasks: list[dict]) -> None:
    if not isinstance(opts.get("train"), str | dict):
        return  # the schema or the data loader names it
    text, label, task = opts.get("text_column", "text"), opts.get("label_column", "label"), opts.get("task_column")
    columns = [text, label] + ([task] if task else [])
    domains: dict[str, set] = {}
    read: dict[str, list] = {}
    for split in ("train", "test"):
        if not isinstance(opts.get(split), str | dict):
            continue
        for domain, path in _files(opts[split]):
            where = f"data.options.{split}" + (f".{domain}" if domain is not None else "")
            frame = read_table(path, where, columns)
            read.setdefault(split, []).append((where, path, list(frame[label])))
            found = set(map(str, frame[task])) if task else ({domain} if domain is not None else set())
            domains.setdefault(split, set()).update(found)
    names = label_names([v for _, _, vs in read["train"] for v in vs], opts.get("labels"), "data.options.labels")
    for parts in read.values():
        for where, path, values in parts:
            check_labels(values, names, where, path)
    for t in tasks:
        if not isinstance(t.get("domain"), str):
            continue
        for split, have in domains.items():
            if t["domain"] not in have:
                raise ValueError(
                    f"task {t.get('name')!r} has no {split} examples (domain {t['domain']!r} absent from the "
                    f"{split} files; their domains: {', '.join(sorted(have))})"
                )
