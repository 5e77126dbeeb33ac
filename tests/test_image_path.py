"""One image path: every entry point (inference, training batches, evaluator training, evaluation, data
preparation) turns the same radiograph into the same model input, whether it comes as a 16-bit PNG, an
8-bit PNG or a 12-bit DICOM."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from biomedjourney.dataset import ImageRow
from biomedjourney.imaging import load_model_input, read_image, to_model_input, to_uint8

H, W = 300, 260          # not square, not 256: the shorter-side resize and the centre crop both happen
BITS = 12
ONE_LEVEL = 1 / 255 + 1e-6  # 8-bit vs 16-bit source: at most one grey level apart


def picture() -> np.ndarray:
    """A smooth 12-bit (H, W) uint16 radiograph-like image: a vertical ramp, two dark 'lungs', a bright
    'spine', a fine horizontal ripple; the full 0..4095 range is used."""
    y, x = np.mgrid[0:H, 0:W] / np.array([H, W], float)[:, None, None]
    img = 0.35 + 0.4 * y
    for cx in (0.3, 0.7):
        img -= 0.25 * np.exp(-(((x - cx) / 0.13) ** 2 + ((y - 0.45) / 0.25) ** 2))
    img += 0.2 * np.exp(-((x - 0.5) / 0.04) ** 2) + 0.03 * np.sin(y * 60)
    img = (img - img.min()) / (img.max() - img.min())
    return np.round(img * (2 ** BITS - 1)).astype(np.uint16)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same picture as a 16-bit PNG, an 8-bit PNG and a DICOM (MONOCHROME2, 16 allocated, 12 stored)."""
    d = tmp_path_factory.mktemp("one-picture")
    raw = picture()
    out = {"png16": d / "ramp16.png", "png8": d / "ramp8.png", "dicom": d / "ramp.dcm"}
    Image.fromarray(raw).save(out["png16"])                                  # mode I;16
    Image.fromarray(to_uint8(raw / float(2 ** BITS - 1))).save(out["png8"])  # mode L
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "DX"
    ds.set_pixel_data(raw, "MONOCHROME2", BITS)
    ds.save_as(out["dicom"], enforce_file_format=True)
    return out


def row(path: Path) -> ImageRow:
    return ImageRow(image_id=path.stem, path=path, source="test", patient_id="p", study_order="0", view="PA",
                    sex="", age=None, labels=[], text="", license="")


def test_the_three_files_hold_what_they_claim(files):
    with Image.open(files["png16"]) as im:
        assert im.mode == "I;16" and im.size == (W, H)
    with Image.open(files["png8"]) as im:
        assert im.mode == "L" and im.size == (W, H)
    ds = pydicom.dcmread(files["dicom"])
    assert (ds.BitsAllocated, ds.BitsStored, ds.PhotometricInterpretation) == (16, 12, "MONOCHROME2")
    assert int(ds.pixel_array.max()) == 2 ** BITS - 1 and (ds.Rows, ds.Columns) == (H, W)


def test_every_format_gives_the_same_model_input(files):
    x = {k: load_model_input(p) for k, p in files.items()}
    for a in x.values():
        assert a.shape == (256, 256) and a.dtype == np.float32 and 0 <= a.min() < 0.1 and a.max() > 0.9
    assert np.abs(x["png16"] - x["png8"]).max() <= ONE_LEVEL
    assert np.abs(x["dicom"] - x["png16"]).max() <= ONE_LEVEL
    assert np.abs(x["dicom"] - x["png8"]).max() <= ONE_LEVEL
    # the resize and the crop happened (the output is not a slice of the 300x260 source)
    assert not np.allclose(x["png8"], np.asarray(Image.open(files["png8"]), np.float32)[:256, :256] / 255)


def test_load_model_input_is_read_image_then_to_model_input(files):
    p = files["png16"]
    want = to_model_input(read_image(p).pixels, 128, "pad")
    for src in (p, str(p), p.read_bytes(), read_image(p).pixels, read_image(p)):
        assert np.array_equal(load_model_input(src, 128, "pad"), want)


@pytest.mark.parametrize("fmt", ["png16", "png8", "dicom"])
def test_every_entry_point_gives_the_same_model_input(files, fmt):
    from biomedjourney.evaluate.run import load_row
    from train.data import load_gray, stack_images
    from train.train_evaluators import load_arrays

    path = files[fmt]
    ref = load_model_input(path, 256)
    got = {
        "train.data.load_gray": load_gray(path, 256).astype(np.float32) / 255,
        "train.data.stack_images": stack_images([path, path], 256)[1, 0].numpy().astype(np.float32) / 255,
        "train_evaluators.load_arrays": load_arrays([row(path)], 256)[0, 0].numpy(),
        "evaluate.run.load_row": load_row(row(path), 256),
    }
    for name, a in got.items():
        assert a.shape == ref.shape, name
        assert np.array_equal(a, ref), f"{name} differs from load_model_input on the {fmt} file: " \
                                       f"max |diff| {np.abs(a - ref).max():.4f}"
    # the training batch at another resolution (the tiny config trains at 64 px)
    assert np.array_equal(stack_images([path], 64)[0, 0].numpy(), to_uint8(load_model_input(path, 64)))


def test_the_evaluator_trainer_resizes_as_the_evaluators_score(files):
    """Training images at the evaluators' resolution = the 256 px model input resized by the evaluators' own
    preprocessing (the generated 256 px images they score go the same way)."""
    from biomedjourney.evaluate.evaluators import tiny_evaluators, to_resolution
    from train.train_evaluators import load_arrays

    r = tiny_evaluators().cfg.resolution
    x = load_arrays([row(p) for p in files.values()], r)
    want = to_resolution(torch.from_numpy(np.stack([load_model_input(p, 256) for p in files.values()]))[:, None], r)
    assert x.shape == (3, 1, r, r) and torch.equal(x, want)


def test_preparation_reads_every_format_as_inference_does(files):
    """prepare_data registers images as read_image reads them (own aspect, shorter side capped)."""
    from train.prepare_data import registration_input

    full = {k: registration_input(p, 0) for k, p in files.items()}
    for k, a in full.items():
        assert np.array_equal(a, read_image(files[k]).pixels)
    assert np.abs(full["png16"] - full["png8"]).max() <= 0.5 / 255 + 1e-6   # 8-bit rounding only
    assert np.array_equal(full["png16"], full["dicom"])
    small = {k: registration_input(p, 100) for k, p in files.items()}
    assert all(a.shape == (round(H * 100 / W), 100) for a in small.values())
    assert np.abs(small["png16"] - small["png8"]).max() <= ONE_LEVEL
