"""The one place that touches disk formats: safetensors files written atomically, with a hash.

Tensors the pipeline reads back are only ever stored as safetensors (never pickle). Each file
carries a JSON header entry ``varmerge`` with its metadata and a SHA-256 content hash over the
tensors; loading recomputes the hash and refuses a file whose content changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

HEADER_KEY = "varmerge"
FORMAT_VERSION = 1


def content_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file.

    The temp file is fsynced before the rename (and the folder after it), so after a crash or
    power loss ``path`` holds either the old content or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _fsync(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. folders cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """A text file (JSON summaries, tables) written to a temp name, then renamed into place."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def read_header(path: str | os.PathLike) -> dict:
    """The ``varmerge`` header of a file (metadata and stored hash) without reading the tensors.

    Cheap; it does not verify the content hash (:func:`load_tensors` does).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(HEADER_KEY)
        return json.loads(raw) if raw is not None else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {exc}") from exc


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> str:
    """Write tensors + JSON metadata to a safetensors file atomically; return the content hash."""
    if not tensors:
        raise ValueError("refusing to save an empty tensor file")
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    digest = content_hash(plain)
    header = {"format": FORMAT_VERSION, "sha256": digest, **dict(metadata or {})}
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata={HEADER_KEY: json.dumps(header)}))
    return digest


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a file written by :func:`save_tensors`, checking its header and content hash."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(HEADER_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    if raw is None:
        raise ValueError(f"{path}: safetensors file has no '{HEADER_KEY}' metadata; not written by varmerge")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupted varmerge metadata: {exc}") from exc
    if header.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported varmerge file format {header.get('format')!r}")
    digest = content_hash(tensors)
    if digest != header.get("sha256"):
        raise ValueError(
            f"{path}: content hash mismatch (stored {str(header.get('sha256'))[:12]}…, "
            f"computed {digest[:12]}…): the file was modified or corrupted"
        )
    return tensors, header


def save_state_dict(path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> str:
    """A model state dict as safetensors (kind ``state_dict``); returns the content hash."""
    return save_tensors(path, state_dict, {"kind": "state_dict", **dict(metadata or {})})


def load_state_dict(path, expected: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict file; with ``expected`` check that keys and shapes match that model."""
    tensors, header = load_tensors(path)
    if header.get("kind") != "state_dict":
        raise ValueError(f"{path}: holds a {header.get('kind')!r}, not a state_dict")
    if expected is not None:
        check_matches_model(tensors, expected, str(path))
    return tensors


def check_matches_model(tensors: Mapping[str, torch.Tensor], expected: Mapping, where: str) -> None:
    """Keys and shapes of ``tensors`` equal those of ``expected`` (name -> tensor or shape)."""
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing or extra:
        raise ValueError(f"{where}: does not belong to this model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in expected.items():
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
        if tuple(tensors[k].shape) != shape:
            raise ValueError(f"{where}: parameter {k!r} has shape {tuple(tensors[k].shape)}, the model has {shape}")
