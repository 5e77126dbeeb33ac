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
