"""The run store: content keys, paths and ``{path, sha256}`` references of every artifact of a run.

A run folder holds one file per artifact, named ``<folder>/<name>-<key>.<suffix>``. The key is a
SHA-256 over

* the artifact's kind and its inputs (config sections, upstream hashes, α), and
* the **source** of the code that computes it: every module of the ``varmerge`` package plus the
  extra modules the caller names (the Prefect task code), each reduced to its syntax tree, so a
  fix anywhere in the library recomputes what it may affect while a comment or a reformatting
  changes no key.

References name a file relative to the run folder and carry its content hash, so a run folder can
be moved and a changed file is detected. :meth:`RunStore.load` checks a file's hash once per load
(and keeps the result in memory for the process, keyed by path, size, mtime and hash, so a run
that uses one posterior file in several steps reads and hashes it once).

Two runs of the same config at the same time share the folder safely: :meth:`RunStore.compute`
holds an exclusive lock per key (``.locks/<key>.lock``, via ``filelock``) while it checks for the
file and, if it is missing, computes and writes it; the second run waits, then finds the file and
reuses it. Writes are atomic (:mod:`varmerge.files`), so a reader never sees a partial file.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
from filelock import FileLock

from varmerge import files

#: Where each kind of artifact lives in the run folder, and its file suffix.
FOLDERS = {
    "data": ("data", ".safetensors"),
    "base": ("base", ".safetensors"),
    "posterior": ("posteriors", ".safetensors"),
    "sweep": ("sweeps", ".safetensors"),
    "multitask": ("multitask", ".safetensors"),
}

#: Files kept in memory per process (the newest loads).
_CACHE_SIZE = 32


def _module_files(modules: Iterable[ModuleType | str | Path]) -> list[Path]:
    found: list[Path] = []
    for m in modules:
        if isinstance(m, ModuleType):
            path = Path(m.__file__)
            found += sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
        else:
            p = Path(m)
            found += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return found


# CPython 3.11's ast.parse is not safe in two threads at once ("SystemError: AST constructor
# recursion depth mismatch", CPython gh-106905; seen in a Dask worker): one parse at a time.
_PARSE_LOCK = threading.Lock()


@lru_cache(maxsize=256)
def _tree_digest(path: str, mtime_ns: int, size: int) -> str:
    """SHA-256 of a module's syntax tree (comments and layout do not count)."""
    text = Path(path).read_text(encoding="utf-8")
    with _PARSE_LOCK:
        tree = ast.dump(ast.parse(text), include_attributes=False)
    return hashlib.sha256(tree.encode()).hexdigest()


#: Digests of source files by ``path:mtime:size``, kept across processes (as ``__pycache__``
#: keeps bytecode): parsing every module takes most of a second.
DIGESTS_FILE = "source-digests.json"
_DIGESTS_KEPT = 4096


def _file_digests(paths: list[Path]) -> list[str]:
    """:func:`_tree_digest` of each file, from the user's cache where it has them."""
    from varmerge.services import cache_dir

    cache = cache_dir() / DIGESTS_FILE
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    out, new = [], {}
    for f in paths:
        st = f.stat()
        key = f"{f}:{st.st_mtime_ns}:{st.st_size}"
        if key not in known:
            new[key] = _tree_digest(str(f), st.st_mtime_ns, st.st_size)
        out.append(known.get(key) or new[key])
    if new:
        kept = dict(list({**known, **new}.items())[-_DIGESTS_KEPT:])
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            files.write_text_atomic(cache, json.dumps(kept))
        except OSError:  # a read-only home: the digests are recomputed next time
            pass
    return out


def source_files(modules: Iterable[ModuleType | str | Path] = ()) -> list[Path]:
    """The source files of the ``varmerge`` package and of ``modules`` (modules, packages, paths)."""
    import varmerge

    return sorted({f.resolve() for f in _module_files([varmerge, *modules])})


def source_digest(modules: Iterable[ModuleType | str | Path] = ()) -> str:
    """One digest of the syntax trees of :func:`source_files` (names relative to the package)."""
    import varmerge

    top = Path(varmerge.__file__).parent.parent.resolve()
    h = hashlib.sha256()
    paths = source_files(modules)
    for f, digest in zip(paths, _file_digests(paths), strict=True):
        h.update(str(f.relative_to(top) if f.is_relative_to(top) else f.name).encode())
        h.update(digest.encode())
    return h.hexdigest()[:16]


def content_key(kind: str, source: str, *inputs) -> str:
    """A 20-hex-digit key of an artifact's kind, the code's ``source`` digest and its inputs."""
    payload = json.dumps([kind, source, *inputs], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Ref:
    """A file of the run folder (relative path) and its content hash, as passed between steps."""

    path: str
    sha256: str

    def as_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256}


class RunStore:
    """The artifacts of one run folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, code: Iterable[ModuleType | str | Path] = ()):
        self.root = Path(root)
        code = list(code)
        self.source_files = source_files(code)
        self.source = source_digest(code)
        self._cache: OrderedDict[tuple, tuple[dict, dict]] = OrderedDict()

    # -- keys and paths ----------------------------------------------------------------------
    def key(self, kind: str, *inputs) -> str:
        return content_key(kind, self.source, *inputs)

    def path(self, kind: str, key: str, name: str | None = None) -> Path:
        """``<root>/<folder>/<name>-<key><suffix>`` (``name`` defaults to the kind)."""
        if kind not in FOLDERS:
            raise ValueError(f"unknown artifact kind {kind!r}; known: {sorted(FOLDERS)}")
        folder, suffix = FOLDERS[kind]
        return self.root / folder / f"{name or kind}-{key}{suffix}"

    def resolve(self, ref: Ref | dict | str | os.PathLike) -> Path:
        """The absolute path of a reference (relative paths are under the run folder)."""
        p = Path(ref.path if isinstance(ref, Ref) else ref["path"] if isinstance(ref, dict) else ref)
        return p if p.is_absolute() else self.root / p

    def ref(self, path: str | os.PathLike, sha256: str) -> dict:
        p = Path(path)
        rel = p.relative_to(self.root) if p.is_absolute() and p.is_relative_to(self.root) else p
        return Ref(rel.as_posix(), sha256).as_dict()

    def find(self, kind: str, key: str, name: str | None = None) -> dict | None:
        """The reference of a finished artifact, or None if it does not exist yet (no hash check:
        the stored hash is read from the header; :meth:`load` checks the content)."""
        path = self.path(kind, key, name)
        if not path.exists():
            return None
        stored = files.read_header(path).get("sha256")
        if not stored:
            raise ValueError(f"{path}: has no content hash; delete it to recompute it")
        return self.ref(path, stored)

    # -- loading -----------------------------------------------------------------------------
    def load(self, ref: dict) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and header of a reference; the content hash is checked against the file's
        stored hash and the reference's, once per process (later loads come from memory)."""
        path = self.resolve(ref)
        if not path.is_file():
            raise ValueError(f"{path}: no such file (the run folder changed since it was recorded)")
        st = path.stat()
        ck = (str(path), st.st_size, st.st_mtime_ns, ref["sha256"])
        if ck in self._cache:
            self._cache.move_to_end(ck)
            return self._cache[ck]
        tensors, header = files.load_tensors(path)
        if header["sha256"] != ref["sha256"]:
            raise ValueError(
                f"{path}: this file changed since the run recorded it (sha256 "
                f"{header['sha256'][:12]}… != {ref['sha256'][:12]}…); re-run to recompute"
            )
        self._cache[ck] = (tensors, header)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return tensors, header

    # -- computing ---------------------------------------------------------------------------
    def lock(self, key: str) -> FileLock:
        """An exclusive inter-process lock for the artifact ``key``."""
        folder = self.root / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(folder / f"{key}.lock"))

    def compute(self, kind: str, key: str, make: Callable[[Path], str], name: str | None = None) -> tuple[dict, bool]:
        """The artifact's reference, computing it with ``make(path) -> sha256`` if it is missing.

        Returns ``(ref, computed)``. Under the key's lock: a file another run finished meanwhile
        is reused; a damaged file (its stored hash does not match its content) stops with an
        error naming it and is never overwritten.
        """
        path = self.path(kind, key, name)
        with self.lock(key):
            found = self.find(kind, key, name)
            if found is not None:
                try:
                    self.load(found)  # a damaged file fails here, naming it
                except ValueError as exc:
                    raise ValueError(f"{exc}; delete it to recompute it") from None
                return found, False
            sha = make(path)
            return self.ref(path, sha), True


def folder_hash(path: str | os.PathLike) -> str:
    """SHA-256 over the relative names and bytes of every file below ``path`` (a file: its bytes)."""
    root = Path(path)
    h = hashlib.sha256()
    if root.is_file():
        h.update(root.read_bytes())
        return h.hexdigest()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()
