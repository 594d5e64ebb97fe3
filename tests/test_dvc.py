"""DVC: the repo's configuration, ``dvc repro prepare_data`` / push / pull offline in a copy of
the checkout, and :func:`tasks.dvc_version.data_version`.

The slow tests copy the working tree (tracked and untracked-but-not-ignored files, so also files
not committed yet) into ``tmp_path``, ``git init`` it and run the ``dvc`` CLI there; the local
remote in ``.dvc/config`` is relative (``../dvc-storage`` from ``.dvc/``), so the copy pushes to
its own ``dvc-storage/``. The ``front`` stage (a full Prefect flow, ~1.5 min) is not run here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.dvc_version import StaleDataError, data_version, workspace_hash

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytest.importorskip("dvc")
configobj = pytest.importorskip("configobj")


# ------------------------------------------------------------------------- helpers


def _env(tmp: Path) -> dict[str, str]:
    """Offline, quiet, and isolated from the user's global/system DVC config and site cache."""
    env = dict(os.environ)
    env.update(
        {
            # without this venv: the README's commands must put it on the PATH themselves
            "PATH": os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != BIN),
            "DVC_NO_ANALYTICS": "1",
            "DVC_STUDIO_OFFLINE": "true",
            "DVC_GLOBAL_CONFIG_DIR": str(tmp / "dvc-global"),
            "DVC_SYSTEM_CONFIG_DIR": str(tmp / "dvc-system"),
            "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache"),
            "DO_NOT_TRACK": "true",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.com",
        }
    )
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _dvc(*args: str, cwd: Path, env: dict[str, str]) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd, env)


def _tree_md5(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _lock_out(root: Path, stage: str, path: str) -> dict:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    (out,) = [o for o in lock["stages"][stage]["outs"] if o["path"] == path]
    return out


# ------------------------------------------------------------------ the repo's config (fast)


def test_dvc_repo_files_exist_and_config_is_offline_with_a_relative_local_remote():
    for f in (".dvc/config", ".dvc/.gitignore", ".dvcignore", "dvc.yaml", "params.yaml"):
        assert (REPO / f).is_file(), f"{f} missing (run `dvc init`)"
    cfg = configobj.ConfigObj(str(REPO / ".dvc" / "config"))
    assert cfg["core"]["analytics"] == "false"
    name = cfg["core"]["remote"]
    url = cfg[f'remote "{name}"']["url"]
    assert "://" not in url and not os.path.isabs(url), f"remote url {url!r} must be a relative local path"
    storage = (REPO / ".dvc" / url).resolve()
    assert REPO in storage.parents, "the remote lives inside the checkout"
    if shutil.which("git") and (REPO / ".git").exists():
        rel = storage.relative_to(REPO).as_posix()
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{rel}/x"], cwd=REPO)
        assert ignored.returncode == 0, f"{rel}/ must be gitignored"


def test_dvc_yaml_params_and_deps_match_the_repo():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(pipeline["stages"]) == {"prepare_data", "front"}
    for name, stage in pipeline["stages"].items():
        for key in stage.get("params", []):
            assert key in params, f"stage {name}: param {key!r} not in params.yaml"
        for dep in stage.get("deps", []):
            assert (REPO / dep).exists() or dep == "data/dvc", f"stage {name}: dep {dep} missing"
    assert "data/dvc" in pipeline["stages"]["prepare_data"]["outs"]
    assert "data/dvc" in pipeline["stages"]["front"]["deps"]


# ----------------------------------------------------------- data_version on fake repos (fast)


def _fake_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / ".dvc").mkdir(parents=True)
    data = root / "data" / "ds"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("a\n")
    (data / "sub" / "b.bin").write_bytes(b"\x00\x01")
    return root


def test_data_version_reads_dvc_lock_and_dvc_files(tmp_path):
    root = _fake_repo(tmp_path)
    md5 = workspace_hash(root / "data" / "ds")
    assert md5.endswith(".dir")
    (root / "dvc.lock").write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {
                    "prep": {
                        "cmd": "x",
                        "outs": [{"path": "data/ds", "hash": "md5", "md5": md5, "size": 5, "nfiles": 2}],
                    }
                },
            }
        )
    )
    assert data_version(root / "data" / "ds") == md5
    assert data_version("data/ds", repo_root=root) == md5
    assert data_version("data/./ds/", repo_root=root, verify=True) == md5
    assert data_version(root / "data" / "ds" / "a.txt") is None  # inside a tracked folder
    assert data_version(root / "data") is None
    assert data_version(tmp_path / "elsewhere") is None  # not in a DVC repo
    assert data_version(tmp_path, repo_root=root) is None  # outside the repo

    # a `dvc add` output: the md5 of a single file, from data/model.bin.dvc
    (root / "data" / "model.bin").write_bytes(b"weights")
    file_md5 = hashlib.md5(b"weights").hexdigest()
    (root / "data" / "model.bin.dvc").write_text(
        yaml.safe_dump({"outs": [{"md5": file_md5, "size": 7, "hash": "md5", "path": "model.bin"}]})
    )
    assert data_version(root / "data" / "model.bin", verify=True) == file_md5


def test_data_version_verify_detects_a_stale_workspace(tmp_path):
    root = _fake_repo(tmp_path)
    md5 = workspace_hash(root / "data" / "ds")
    (root / "dvc.lock").write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {"prep": {"cmd": "x", "outs": [{"path": "data/ds", "hash": "md5", "md5": md5}]}},
            }
        )
    )
    (root / "data" / "ds" / "a.txt").write_text("edited\n")
    assert data_version(root / "data" / "ds") == md5  # the recorded version, without verify
    with pytest.raises(StaleDataError, match="differs"):
        data_version(root / "data" / "ds", verify=True)
    shutil.rmtree(root / "data" / "ds")
    with pytest.raises(StaleDataError, match="missing"):
        data_version(root / "data" / "ds", verify=True)


def test_workspace_hash_skips_dvcignored_files(tmp_path):
    root = _fake_repo(tmp_path)
    before = workspace_hash(root / "data" / "ds")
    (root / ".dvcignore").write_text("__pycache__/\n*.pyc\n")
    (root / "data" / "ds" / "__pycache__").mkdir()
    (root / "data" / "ds" / "__pycache__" / "m.pyc").write_bytes(b"x")
    (root / "data" / "ds" / "n.pyc").write_bytes(b"y")
    assert workspace_hash(root / "data" / "ds") == before


# -------------------------------------------------- dvc repro / push / pull in a copy (slow)


@pytest.fixture(scope="module")
def dvc_copy(tmp_path_factory):
    """A git repo in tmp holding the working tree's files, with prepare_data reproduced."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    tmp = tmp_path_factory.mktemp("dvc")
    root = tmp / "repo"
    env = _env(tmp)
    files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO, env)
    for rel in filter(None, files.split("\0")):
        src = REPO / rel
        if src.is_file():  # skip files deleted in the working tree
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    assert (root / ".dvc" / "config").is_file() and not (root / ".dvc" / "cache").exists()
    _run(["git", "init", "-q"], root, env)
    (root / ".venv").symlink_to(BIN.parent)  # the checkout's venv, as `make setup` leaves it
    # the README's own lines, as printed: activate the venv, then `dvc repro prepare_data`
    activate, repro = _readme_dvc_lines()[:2]
    assert activate.startswith("source .venv/bin/activate") and repro == "dvc repro prepare_data"
    _run(["bash", "-c", f"{activate} && {repro}"], root, env)
    return root, env


def _readme_dvc_lines() -> list[str]:
    """The commands of the README's DVC block, comments stripped."""
    text = (REPO / "README.md").read_text().split("## Data versions (DVC)", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_repro_prepare_data_records_the_data_md5(dvc_copy):
    root, env = dvc_copy
    data = root / "data" / "dvc"
    assert (data / "dataset_dict.json").is_file()
    assert {p.name for p in data.iterdir()} >= {"train", "test"}
    out = _lock_out(root, "prepare_data", "data/dvc")
    assert out["hash"] == "md5" and out["md5"].endswith(".dir") and out["nfiles"] >= 3
    assert data_version(data) == out["md5"]
    assert data_version("data/dvc", repo_root=root, verify=True) == out["md5"]
    # the .dir listing in the cache is what data_version's verify recomputes
    listing = root / ".dvc" / "cache" / "files" / "md5" / out["md5"][:2] / out["md5"][2:]
    assert json.loads(listing.read_text()) == [{"md5": m, "relpath": r} for r, m in sorted(_tree_md5(data).items())]
    # nothing left to do for prepare_data; the data is gitignored, dvc.lock is not
    assert "didn't change" in _dvc("repro", "prepare_data", cwd=root, env=env)
    assert subprocess.run(["git", "check-ignore", "-q", "data/dvc"], cwd=root).returncode == 0
    assert subprocess.run(["git", "check-ignore", "-q", "dvc.lock"], cwd=root).returncode == 1


@pytest.mark.slow
def test_push_delete_pull_restores_identical_data(dvc_copy):
    root, env = dvc_copy
    data = root / "data" / "dvc"
    before = _tree_md5(data)
    md5 = _lock_out(root, "prepare_data", "data/dvc")["md5"]

    _dvc("push", "prepare_data", cwd=root, env=env)
    storage = root / "dvc-storage"
    assert (storage / "files" / "md5" / md5[:2] / md5[2:]).is_file()

    shutil.rmtree(data)
    shutil.rmtree(root / ".dvc" / "cache")
    assert data_version(data) == md5  # still recorded in dvc.lock
    with pytest.raises(StaleDataError):
        data_version(data, verify=True)

    _dvc("pull", "prepare_data", cwd=root, env=env)
    assert _tree_md5(data) == before
    assert data_version(data, verify=True) == md5
    status = json.loads(_dvc("status", "prepare_data", "--json", cwd=root, env=env))
    assert status == {}
