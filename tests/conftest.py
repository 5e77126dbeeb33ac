"""Shared fixtures: tiny models and tiny slices of the shared dataset (built in the test session)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random pipeline folder (64 px) saved with save_pretrained."""
    from biomedjourney.pipeline import tiny_pipeline
    return tiny_pipeline(seed=0).save_pretrained(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def pipe():
    """A tiny random pipeline (64 px) for the pipeline tests."""
    from biomedjourney.pipeline import tiny_pipeline
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def prior():
    """A smooth (64, 64) test prior in [0, 1]."""
    import numpy as np
    y, x = np.mgrid[0:64, 0:64] / 63.0
    return (0.2 + 0.6 * np.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) * 6)).astype(np.float32)


@pytest.fixture(scope="session")
def rg1_path():
    from pydicom.data import get_testdata_file
    return get_testdata_file("RG1_UNCI.dcm")


@pytest.fixture(scope="module")
def tiny_prep(tmp_path_factory):
    """stage1.csv / stage2.csv over 8 training and 2 validation pairs of the shared dataset (+ a tiny vae/);
    tests using it skip without the dataset."""
    from biomedjourney import dataset
    from biomedjourney.pipeline import tiny_pipeline
    from train.manifest import STAGE1_COLUMNS, STAGE2_COLUMNS, write_manifest
    out = tmp_path_factory.mktemp("prep")
    pairs = [p for p in dataset.load_pairs() if p.progression_text and dataset.licence_ok_for_weights(p.prior.license)]
    train = [p for p in pairs if p.split == "train"][:8]
    val = [p for p in pairs if p.split == "val"][:2]
    s1, s2 = [], []
    for p in train + val:
        for im in (p.prior, p.followup):
            s1.append(dict(image_id=im.image_id, image=str(im.path), patient_id=im.patient_id, split=p.split,
                           text=dataset.caption_for(im), labels="|".join(im.labels), sex=im.sex, age=im.age or "",
                           view=im.view, license=im.license, source=im.source))
        s2.append(dict(pair_id=p.pair_id, patient_id=p.patient_id, split=p.split, prior=str(p.prior.path),
                       prior_original=str(p.prior.path), followup=str(p.followup.path), text=p.progression_text,
                       text_origin=p.text_origin, reg_score=1.0, kept=True, prior_labels="|".join(p.prior.labels),
                       followup_labels="|".join(p.followup.labels), days_between=p.days_between, license=p.prior.license))
    write_manifest(s1, out / "stage1.csv", STAGE1_COLUMNS)
    write_manifest(s2, out / "stage2.csv", STAGE2_COLUMNS)
    tiny_pipeline().vae.save_pretrained(out / "vae")
    return out


@pytest.fixture(scope="module")
def app_module(tiny_model_dir, tmp_path_factory):
    """app.py pointed at the tiny model ($BIOMEDJOURNEY_MODEL, only while the module's tests run)
    with its per-session output folders in a temp dir (read once, at the first import).
    BIOMEDJOURNEY_TEST_MODEL=assets/biomedjourney-cxr runs the same tests on a real model."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIOMEDJOURNEY_MODEL", os.environ.get("BIOMEDJOURNEY_TEST_MODEL") or str(tiny_model_dir))
        mp.setenv("BIOMEDJOURNEY_OUTPUTS", str(tmp_path_factory.mktemp("app-outputs")))
        import app
        yield app


@pytest.fixture(scope="module")
def app_url(app_module):
    """The app served in-process on 127.0.0.1 at a free port; closed after the module."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app_module.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                           theme=app_module.THEME, css=app_module.CSS)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app_module.demo.close()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module: results compared across batch sizes (a batched matmul splits its
    work by the thread count, so 2 threads round a batch of 3 unlike a batch of 1)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
