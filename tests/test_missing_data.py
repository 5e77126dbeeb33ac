"""The evaluation command lines without the dataset: one clear message and exit status 2, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from biomedjourney import dataset


def _check_message(err: str, root) -> None:
    assert "Traceback" not in err and "FileNotFoundError" not in err
    assert err.count("error:") == 1 and str(root) in err
    assert "BIOMEDJOURNEY_DATA" in err and "../shared/data/cxr" in err
    assert "images.csv" in err and "pairs.csv" in err and "README.md" in err


def test_python_m_evaluate_without_data_exits_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "BIOMEDJOURNEY_DATA": str(empty), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "biomedjourney.evaluate", "--split", "val", "--out", str(tmp_path / "eval")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    _check_message(p.stderr, empty.resolve())
    assert f"BIOMEDJOURNEY_DATA={empty}" in p.stderr
    assert not (tmp_path / "eval").exists()  # nothing written before the check


@pytest.mark.parametrize("module,argv", [
    ("biomedjourney.evaluate.__main__", ["--split", "val", "--out", "OUT"]),
    ("biomedjourney.evaluate.fidelity", ["--out", "OUT"]),
    ("biomedjourney.evaluate.follow", ["--out", "OUT"]),
    ("biomedjourney.evaluate.removal", ["--out", "OUT"]),
    ("train.train_evaluators", ["--out", "OUT"]),
])
def test_evaluation_mains_without_data_exit_2(module, argv, tmp_path, monkeypatch, capsys):
    import importlib
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("BIOMEDJOURNEY_DATA", str(empty))
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    assert e.value.code == 2
    _check_message(capsys.readouterr().err, empty.resolve())
    assert not (tmp_path / "out").exists()


def test_missing_data_help_names_the_source(tmp_path, monkeypatch):
    monkeypatch.delenv("BIOMEDJOURNEY_DATA", raising=False)
    assert "--data " in dataset.missing_data_help(tmp_path)
    assert str(dataset.DEFAULT_DATA) in dataset.missing_data_help()
    (tmp_path / "images.csv").write_text("x\n")
    (tmp_path / "pairs.csv").write_text("x\n")
    assert dataset.require_data(tmp_path) == tmp_path.resolve()


def test_train_evaluators_script_without_data_exits_2(tmp_path):
    """The documented command `python train/train_evaluators.py ...` runs as a script from the repository."""
    from pathlib import Path
    empty = tmp_path / "empty"
    empty.mkdir()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BIOMEDJOURNEY_DATA": str(empty), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(repo / "train" / "train_evaluators.py"), "--out", str(tmp_path / "ev")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    _check_message(p.stderr, empty.resolve())
    assert not (tmp_path / "ev").exists()
