"""The shipped model and segmenter are found installed or not: $ENV, then the copy packaged in the wheel
(biomedjourney/_assets/), then the repository's assets/ (editable install); a clear error otherwise."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from biomedjourney import anatomy, pipeline, resources

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_assets(tmp_path, monkeypatch):
    packaged, repo = tmp_path / "site" / "biomedjourney" / "_assets", tmp_path / "repo" / "assets"
    monkeypatch.setattr(resources, "PACKAGED_ASSETS", packaged)
    monkeypatch.setattr(resources, "REPO_ASSETS", repo)
    monkeypatch.delenv(pipeline.MODEL_ENV, raising=False)
    monkeypatch.delenv(anatomy.SEGMENTER_ENV, raising=False)
    return packaged, repo


def test_lookup_order_env_then_packaged_then_repository(fake_assets, monkeypatch, tmp_path):
    packaged, repo = fake_assets
    for name in resources.SHIPPED:
        (repo / name).mkdir(parents=True)
    assert pipeline.default_model_path() == repo / "biomedjourney-cxr"       # editable / checkout
    assert anatomy.segmenter_path() == repo / "segmenter"
    for name in resources.SHIPPED:
        (packaged / name).mkdir(parents=True)
    assert pipeline.default_model_path() == packaged / "biomedjourney-cxr"   # installed wheel wins
    assert anatomy.segmenter_path() == packaged / "segmenter"
    monkeypatch.setenv(pipeline.MODEL_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv(anatomy.SEGMENTER_ENV, str(tmp_path / "seg"))
    assert pipeline.default_model_path() == tmp_path / "mine"                # the variable wins, as given
    assert anatomy.segmenter_path() == tmp_path / "seg"


def test_no_model_anywhere_names_all_three_places(fake_assets):
    packaged, repo = fake_assets
    with pytest.raises(FileNotFoundError) as e:
        pipeline.default_model_path()
    msg = str(e.value)
    assert "$BIOMEDJOURNEY_MODEL" in msg and str(packaged / "biomedjourney-cxr") in msg
    assert str(repo / "biomedjourney-cxr") in msg
    with pytest.raises(FileNotFoundError, match="BIOMEDJOURNEY_SEGMENTER"):
        anatomy.segmenter_path()
    an = anatomy.segment(__import__("pydicom.data").data.get_testdata_file("RG1_UNCI.dcm"))
    assert an.source == "atlas"  # a missing segmenter still falls back to the average anatomy


def _source_copy(dst: Path) -> Path:
    """What an sdist holds (pyproject, setup.py, MANIFEST.in, the package, the two shipped asset folders):
    built in a copy so the build leaves nothing in the working tree."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    dst.mkdir(parents=True)
    for f in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "requirements.txt"):
        shutil.copy2(REPO / f, dst / f)
    shutil.copytree(REPO / "biomedjourney", dst / "biomedjourney", ignore=skip)
    for name in resources.SHIPPED:
        shutil.copytree(REPO / "assets" / name, dst / "assets" / name, ignore=skip)
    return dst


@pytest.mark.slow
@pytest.mark.skipif(not all((REPO / "assets" / n).is_dir() for n in resources.SHIPPED), reason="no shipped assets")
def test_wheel_installs_and_generates_with_the_packaged_model(tmp_path, rg1_path):
    src = _source_copy(tmp_path / "src")
    wheels, venv, work = tmp_path / "wheels", tmp_path / "venv", tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", pipeline.MODEL_ENV, anatomy.SEGMENTER_ENV, "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    def run(*cmd, timeout=120):
        p = subprocess.run([str(c) for c in cmd], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p.stdout

    run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-w", wheels)
    (wheel,) = wheels.glob("biomedjourney-*.whl")
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("biomedjourney-cxr/model_index.json", "biomedjourney-cxr/unet/diffusion_pytorch_model.safetensors",
              "segmenter/config.json", "segmenter/model.safetensors"):
        assert f"biomedjourney/_assets/{f}" in names, f
    run(sys.executable, "-m", "venv", "--system-site-packages", venv)
    py, bindir = venv / "bin" / "python", venv / "bin"
    run(py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel)
    where = json.loads(run(py, "-c", "import json, biomedjourney, biomedjourney.pipeline as p, biomedjourney.anatomy as a; "
                                     "print(json.dumps([biomedjourney.__file__, str(p.default_model_path()), "
                                     "str(a.segmenter_path())]))"))
    site = venv.resolve()
    assert all(Path(w).resolve().is_relative_to(site) for w in where), where  # not the editable checkout
    assert where[1].endswith(os.path.join("biomedjourney", "_assets", "biomedjourney-cxr"))
    out = tmp_path / "out"
    run(bindir / "biomedjourney", "generate", "--prior", rg1_path, "--text", "New right pleural effusion.",
        "--num-images", "1", "--steps", "2", "--out", out, timeout=180)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model"] == "biomedjourney-cxr" and settings["anatomy"] == "network"
    assert (out / "followup_1_seed0.png").is_file()
    assert str(tmp_path) not in (out / "settings.json").read_text()
