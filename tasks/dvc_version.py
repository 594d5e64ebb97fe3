"""The DVC version of a data folder, for MLflow tags: the md5 DVC recorded for it.

``data_version("data/dvc")`` reads the ``md5`` of that output from ``dvc.lock`` (a ``dvc repro``
output) or from a ``.dvc`` file (a ``dvc add`` output), e.g. ``"80dbf8...f6.dir"`` for a folder,
exactly as DVC writes it (the ``.dir`` suffix marks a directory; the value is the key of the
folder's listing in the DVC cache and remote). A path that DVC does not track, or one declared in
``dvc.yaml`` but never reproduced, gives ``None``.

Pure Python (PyYAML only): it never imports ``dvc``, starts no process and needs no network.
``verify=True`` also hashes the workspace copy the way DVC 3 does and raises if it differs from
the recorded hash (data edited, or not checked out, since ``dvc repro`` / ``dvc pull``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import yaml

__all__ = ["StaleDataError", "data_version", "find_repo_root", "workspace_hash"]

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CHUNK = 1 << 20
# folders DVC never includes in a directory hash (besides .dvcignore patterns)
_ALWAYS_IGNORED = {".git", ".hg", ".dvc"}


class StaleDataError(ValueError):
    """The workspace copy of a tracked path does not match the hash DVC recorded for it."""


def find_repo_root(start: str | os.PathLike) -> Path | None:
    """The nearest folder at or above ``start`` that holds a ``.dvc/`` folder (a DVC repo)."""
    p = Path(start).resolve()
    for d in (p, *p.parents):
        if (d / ".dvc").is_dir():
            return d
    return None


def _load_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.load(f, Loader=_Loader)
    except (OSError, yaml.YAMLError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _wdir(stage: object) -> str:
    """A stage's ``wdir`` from dvc.yaml (``foreach``/``matrix`` stages keep it in ``do``)."""
    if not isinstance(stage, dict):
        return "."
    wdir = stage.get("wdir", (stage.get("do") or {}).get("wdir", "."))
    return wdir if isinstance(wdir, str) and "${" not in wdir else "."


def _lock_outs(lock: Path) -> Iterator[tuple[Path, dict]]:
    """(absolute path, out entry) of every output recorded in one dvc.lock."""
    stages = _load_yaml(lock).get("stages") or {}
    defs = _load_yaml(lock.with_name("dvc.yaml")).get("stages") or {}
    for name, stage in stages.items():
        if not isinstance(stage, dict):
            continue
        base = lock.parent / _wdir(defs.get(str(name).split("@", 1)[0]))
        for out in stage.get("outs") or []:
            if isinstance(out, dict) and "path" in out:
                yield base / out["path"], out


def _dvcfile_outs(dvcfile: Path) -> Iterator[tuple[Path, dict]]:
    """(absolute path, out entry) of the outputs of one ``.dvc`` file."""
    doc = _load_yaml(dvcfile)
    wdir = doc.get("wdir", ".")
    base = dvcfile.parent / (wdir if isinstance(wdir, str) else ".")
    for out in doc.get("outs") or []:
        if isinstance(out, dict) and "path" in out:
            yield base / out["path"], out


def _candidates(target: Path, root: Path) -> Iterator[tuple[Path, dict]]:
    """Recorded outputs that could be ``target``: dvc.lock files from ``root`` down to the
    target's folder, then the ``.dvc`` files beside the target."""
    folders = [root]
    for part in target.parent.relative_to(root).parts:
        folders.append(folders[-1] / part)
    for d in folders:
        lock = d / "dvc.lock"
        if lock.is_file():
            yield from _lock_outs(lock)
    parent = target.parent
    if parent.is_dir():
        for dvcfile in sorted(parent.glob("*.dvc")):
            if dvcfile.is_file():
                yield from _dvcfile_outs(dvcfile)


def _recorded(target: Path, root: Path) -> dict | None:
    for path, out in _candidates(target, root):
        if path.resolve() == target and out.get("md5"):
            return out
    return None


def data_version(
    path: str | os.PathLike, repo_root: str | os.PathLike | None = None, *, verify: bool = False
) -> str | None:
    """The md5 DVC recorded for ``path`` (``"<md5>.dir"`` for a folder), or ``None``.

    ``path`` may be absolute, or relative to ``repo_root`` when that is given (else to the
    current folder). ``repo_root`` defaults to the nearest folder above ``path`` with a ``.dvc/``.
    ``None`` when there is no DVC repo, the path is outside it, or no ``dvc.lock`` / ``.dvc``
    file records it as an output (a file *inside* a tracked folder has no hash of its own).
    With ``verify=True``, raise :class:`StaleDataError` when the workspace copy is missing or
    its DVC-3 hash differs from the recorded one.
    """
    path = Path(path)
    if repo_root is not None and not path.is_absolute():
        path = Path(repo_root) / path
    target = path.resolve()
    if repo_root is not None:
        root = Path(repo_root).resolve()
    else:
        root = find_repo_root(target if target.exists() else target.parent)
        if root is None:
            return None
    if root not in target.parents:
        return None
    out = _recorded(target, root)
    if out is None:
        return None
    md5 = str(out["md5"])
    if verify:
        _verify(target, out, root)
    return md5


def _verify(target: Path, out: dict, root: Path) -> None:
    md5 = str(out["md5"])
    if out.get("hash") != "md5":
        # DVC 2 entries (no "hash: md5") use md5 of dos2unix-normalised text files
        raise StaleDataError(f"{target}: recorded by DVC 2 ({md5}); cannot verify, run `dvc repro`")
    if not target.exists():
        raise StaleDataError(f"{target}: tracked by DVC ({md5}) but missing; run `dvc pull` or `dvc repro`")
    actual = workspace_hash(target, root)
    if actual != md5:
        raise StaleDataError(
            f"{target}: workspace hash {actual} differs from the recorded {md5}; "
            "run `dvc repro` (or `dvc checkout` to restore the recorded version)"
        )


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _ignore_spec(root: Path | None):
    """The repo's root ``.dvcignore`` as a gitwildmatch spec (pathspec ships with DVC), or None."""
    if root is None or not (root / ".dvcignore").is_file():
        return None
    try:
        import pathspec
    except ImportError:  # pragma: no cover - pathspec is a dvc dependency
        return None
    lines = (root / ".dvcignore").read_text(encoding="utf-8").splitlines()
    return pathspec.PathSpec.from_lines("gitwildmatch", lines)


def workspace_hash(path: str | os.PathLike, repo_root: str | os.PathLike | None = None) -> str:
    """DVC 3's md5 of a file, or of a folder (``"<md5>.dir"``: the md5 of the JSON listing of
    its files' md5s, sorted by relative path), skipping what the root ``.dvcignore`` ignores."""
    path = Path(path)
    if path.is_file():
        return _file_md5(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no file or folder at {path}")
    root = Path(repo_root) if repo_root is not None else find_repo_root(path)
    spec = _ignore_spec(root)
    rel_root = Path(os.path.relpath(path.resolve(), root.resolve())) if spec is not None else None
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if d not in _ALWAYS_IGNORED]
        rel_dir = Path(dirpath).relative_to(path)
        if spec is not None:
            dirnames[:] = [d for d in dirnames if not spec.match_file((rel_root / rel_dir / d).as_posix() + "/")]
        for name in filenames:
            rel = rel_dir / name
            if spec is not None and spec.match_file((rel_root / rel).as_posix()):
                continue
            entries.append({"md5": _file_md5(Path(dirpath) / name), "relpath": rel.as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"
