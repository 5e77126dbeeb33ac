"""biomedjourney.atomic: the one atomic-write helper (files and folders) that every writer uses."""
from __future__ import annotations

import os
import stat

import pytest

from biomedjourney import imaging
from biomedjourney.atomic import atomic_write, write_text


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_a_file_is_written_in_place_with_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "sub" / "a.txt", lambda tmp: open(tmp, "w").write("one"))
    finally:
        os.umask(umask)
    assert p == tmp_path / "sub" / "a.txt" and p.read_text() == "one"
    assert _mode(p) == 0o644                                  # not tempfile's private 0o600
    write_text(p, "two")
    assert p.read_text() == "two" and sorted(x.name for x in p.parent.iterdir()) == ["a.txt"]
    assert imaging.atomic_write is atomic_write               # existing callers keep the same helper


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    p = write_text(tmp_path / "a.json", "old")

    def boom(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["a.json"]


def test_a_folder_replaces_the_old_one_as_a_whole(tmp_path):
    def folder(files):
        def write(tmp):
            for name, text in files.items():
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(text)
        return write

    d = atomic_write(tmp_path / "step-00000001", folder({"a": "1", "b": "1"}), directory=True)
    assert sorted(x.name for x in d.iterdir()) == ["a", "b"]
    atomic_write(d, folder({"a": "2"}), directory=True)
    assert sorted(x.name for x in d.iterdir()) == ["a"] and (d / "a").read_text() == "2"   # b is gone

    def half(tmp):
        folder({"a": "3"})(tmp)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(d, half, directory=True)
    assert (d / "a").read_text() == "2" and sorted(x.name for x in tmp_path.iterdir()) == ["step-00000001"]
    assert not list(tmp_path.glob("step-*.tmp"))              # temp names start with a dot: no glob sees them


def test_checkpoints_and_manifests_go_through_the_helper(tmp_path, monkeypatch):
    import torch

    from biomedjourney import atomic
    from train import checkpoint, manifest

    calls = []
    real = atomic.atomic_write

    def spy(path, write, **kw):
        calls.append((os.path.basename(path), kw.get("directory", False)))
        return real(path, write, **kw)

    monkeypatch.setattr(checkpoint, "atomic_write", spy)
    monkeypatch.setattr(manifest, "atomic_write", spy)
    m = torch.nn.Linear(2, 2)
    ck = checkpoint.save_checkpoint(tmp_path / "ck", 3, models={"m": m}, keep=1)
    checkpoint.save_checkpoint(tmp_path / "ck", 4, models={"m": m}, keep=1)
    assert checkpoint.find_checkpoint(tmp_path / "ck").name == "step-00000004" and not ck.exists()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000004"]
    manifest.write_manifest([{"image_id": "i"}], tmp_path / "stage1.csv", manifest.STAGE1_COLUMNS)
    assert calls == [("step-00000003", True), ("step-00000004", True), ("stage1.csv", False)]


def test_checkpoint_pruning_renames_before_deleting_and_cleans_what_a_crash_left(tmp_path, monkeypatch):
    import shutil

    import torch

    from train import checkpoint
    m = torch.nn.Linear(2, 2)
    root = tmp_path / "ck"
    checkpoint.save_checkpoint(root, 1, models={"m": m}, keep=1)
    real = shutil.rmtree
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)  # a crash before the delete
    checkpoint.save_checkpoint(root, 2, models={"m": m}, keep=1)
    assert sorted(p.name for p in root.iterdir()) == [".step-00000001.deleting", "step-00000002"]
    assert checkpoint.find_checkpoint(root).name == "step-00000002"     # the old one is out of `latest`'s reach
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    checkpoint.save_checkpoint(root, 3, models={"m": m}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
