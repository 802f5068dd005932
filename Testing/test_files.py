"""core/files.py: atomic files, the staged folder swap and its rollback, and a model re-saved over itself with a
failure injected part way (the previous model must come out byte for byte the same and still load)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from BrainAnomalyLib.core import files
from BrainAnomalyLib.core.files import (folder_digest, interrupted_swap, staged_folder, umask, write_atomic)
from BrainAnomalyLib.store.models import load_model, save_model

META = {"kind": "normative", "modality": "T1", "grid": {}}


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _model(folder: Path, value: float) -> Path:
    return save_model(folder, dict(META, version=str(value)), {"mean": np.full((3, 4), value, np.float32),
                                                               "sd": np.ones((3, 4), np.float32)})


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = write_atomic(tmp_path / "a.json", '{"v": 1}\n')
    assert path.read_text() == '{"v": 1}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask()  # not mkstemp's private 0600
    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(path, b"half")
    assert path.read_text() == '{"v": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # the temporary file went too


def test_save_model_failing_halfway_keeps_the_previous_model(tmp_path, monkeypatch):
    folder = _model(tmp_path / "m", 1.0)
    before, digest = snapshot(folder), folder_digest(folder)
    from safetensors import numpy as st

    real = st.save_file

    def half_then_fail(tensors, path, *a, **k):  # the tensor file is on disk, model.json not yet
        real(tensors, path, *a, **k)
        Path(path).write_bytes(Path(path).read_bytes()[:40])
        raise OSError("no space left on device")

    monkeypatch.setattr(st, "save_file", half_then_fail)
    with pytest.raises(OSError, match="no space"):
        _model(folder, 2.0)
    monkeypatch.undo()
    assert snapshot(folder) == before
    model = load_model(folder, expected_digest=digest)
    assert model.meta["version"] == "1.0" and np.all(model.tensors["mean"] == 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_failed_swap_is_rolled_back(tmp_path, monkeypatch):
    folder = _model(tmp_path / "m", 1.0)
    before = snapshot(folder)
    real = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old folder moved aside, new one not yet in place
            raise PermissionError("folder in use")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", second_rename_fails)
    with pytest.raises(PermissionError):
        _model(folder, 2.0)
    monkeypatch.undo()
    assert calls == [("m", "old"), ("new", "m"), ("old", "m")]  # aside, the failed swap, back
    assert snapshot(folder) == before and load_model(folder).meta["version"] == "1.0"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_swap_killed_between_renames_is_recovered(tmp_path, monkeypatch):
    folder = _model(tmp_path / "m", 1.0)
    before = snapshot(folder)
    real = os.replace

    def killed(src, dst):  # after the first rename the process is gone: no more renames happen
        if Path(dst).name != "old":
            raise OSError("killed")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(OSError):
        _model(folder, 2.0)
    monkeypatch.undo()
    assert not folder.exists()
    previous = interrupted_swap(folder)
    assert previous is not None and snapshot(previous) == before
    # A listing of */model.json does not see the moved-aside copy (it sits one level further down).
    assert not list(tmp_path.glob("*/model.json"))
    # The next write to that destination puts the previous folder back first, then replaces it properly.
    with staged_folder(folder) as stage:
        assert snapshot(folder) == before
        (stage / "x.txt").write_text("new")
    assert snapshot(folder) == {"x.txt": b"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_staged_folder_modes_and_error_in_block(tmp_path):
    target = tmp_path / "case"
    with staged_folder(target) as stage:
        (stage / "sub").mkdir()
        (stage / "sub" / "a.txt").write_text("a")
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask()  # not mkdtemp's private 0700
    assert stat.S_IMODE((target / "sub" / "a.txt").stat().st_mode) == 0o666 & ~umask()
    with pytest.raises(RuntimeError):
        with staged_folder(target) as stage:
            (stage / "b.txt").write_text("b")
            raise RuntimeError("cancelled")
    assert snapshot(target) == {"sub/a.txt": b"a"}
    assert [p.name for p in tmp_path.iterdir()] == ["case"]
