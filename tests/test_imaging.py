"""Tests for biomedjourney.imaging: reading (PNG/JPEG/DICOM), guards, model input, writing."""
from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless,
                         SecondaryCaptureImageStorage)

from biomedjourney.imaging import (IDENTIFYING_DICOM_KEYWORDS, ImageLoadError, LoadedImage,
                                   cxr_warnings, load_image, mark_synthetic, read_dicom_markers,
                                   read_image, save_png, synthetic_label_box, to_model_input,
                                   write_dicom)

RG1 = get_testdata_file("RG1_UNCI.dcm")  # chest PA CR, MONOCHROME1, 15-bit, from pydicom-data


# ---------------------------------------------------------------- fixture makers
def _png(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return buf.getvalue()


def _dicom(arr: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
           preamble: bool = True, **attrs) -> bytes:
    """A small DICOM file (bytes) holding ``arr``; ``attrs`` are set on the dataset."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.set_pixel_data(arr, photometric, bits)
    for k, v in attrs.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    if preamble:
        ds.save_as(buf, enforce_file_format=True)
    else:  # bare dataset: no preamble, no file meta, implicit VR
        del ds.file_meta
        ds.save_as(buf, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def _gradient(h: int = 96, w: int = 80, hi: int = 4095) -> np.ndarray:
    return np.round(np.linspace(0, hi, w))[None].repeat(h, 0).astype(np.uint16)  # (h, w)


@pytest.fixture(scope="module")
def rg1() -> LoadedImage:
    return read_image(RG1)


# ---------------------------------------------------------------- DICOM reading
def test_rg1_reads_without_identifiers(rg1):
    ds = pydicom.dcmread(RG1)
    px = rg1.pixels
    assert px.ndim == 2 and px.shape == (ds.Rows, ds.Columns) and px.dtype == np.float32
    assert 0.0 <= px.min() < px.max() <= 1.0 and px.std() > 0.05
    # MONOCHROME1 -> inverted: exactly anti-correlated with the stored values (window is linear)
    raw = ds.pixel_array.astype(np.float64)
    assert np.corrcoef(px.ravel()[::97], raw.ravel()[::97])[0, 1] < -0.999
    m = rg1.meta
    assert (m["format"], m["modality"], m["view_position"], m["photometric"]) == ("dicom", "CR", "PA", "MONOCHROME1")
    assert "15000" in m["window"]
    keys = {k.replace("_", "").lower() for k in m}
    assert not keys & {k.lower() for k in IDENTIFYING_DICOM_KEYWORDS}
    text = repr(m)
    for kw in ("PatientName", "PatientID", "InstitutionName", "StudyInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(kw, ""))
        assert value and value not in text, kw


def test_rg1_load_image_shape(rg1):
    x = load_image(RG1)
    assert tuple(x.shape) == (1, 256, 256) and str(x.dtype) == "torch.float32"
    assert 0 <= float(x.min()) < float(x.max()) <= 1
    np.testing.assert_allclose(x[0].numpy(), to_model_input(rg1.pixels), atol=1e-6)


def test_monochrome1_is_inverted_monochrome2():
    g = _gradient()
    m2 = read_image(_dicom(g, "MONOCHROME2")).pixels
    m1 = read_image(_dicom(g, "MONOCHROME1")).pixels
    assert m2[0, 0] == 0 and m2[0, -1] == 1 and np.all(np.diff(m2[0]) >= 0)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_16bit_rescale_and_window():
    # stored s -> HU = 2 s - 1000; window centre 0, width 400 (LINEAR): HU -200..200
    s = _gradient(96, 80, hi=65535)
    s[:, :10], s[:, 10:20], s[:, 20:30], s[:, 30:40] = 300, 500, 550, 700  # HU -400, 0, 100, 400
    px = read_image(_dicom(s, bits=16, RescaleSlope=2, RescaleIntercept=-1000,
                           WindowCenter=0, WindowWidth=400)).pixels
    linear = lambda hu: np.clip((hu + 0.5) / 399 + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1
    assert px[5, 5] == 0.0                                    # below the window
    assert px[5, 15] == pytest.approx(linear(0), abs=1e-4)    # centre ~0.5
    assert px[5, 25] == pytest.approx(linear(100), abs=1e-4)  # inside
    assert px[5, 35] == 1.0                                   # above the window


def test_window_first_of_several_and_no_window_minmax():
    g = _gradient(hi=1000)
    two = read_image(_dicom(g, WindowCenter=[250, 900], WindowWidth=[101, 50])).pixels
    assert two[0, 0] == 0 and two[0, -1] == 1
    inside = int(np.sum((two[0] > 0) & (two[0] < 1)))  # columns within 250 +- 50 (step 12.7)
    assert 7 <= inside <= 9, inside                        # the 900/50 window would give ~4
    plain = read_image(_dicom(g)).pixels  # no window -> min-max
    np.testing.assert_allclose(plain[0], g[0] / 1000, atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_dicom_roundtrip(syntax):
    rng = np.random.default_rng(0)
    arr = (rng.integers(0, 4096, (96, 80)) // 64 * 64).astype(np.uint16)
    ds = pydicom.dcmread(io.BytesIO(_dicom(arr)))
    ds.compress(syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    got = read_image(buf.getvalue())
    np.testing.assert_allclose(got.pixels, read_image(_dicom(arr)).pixels, atol=1e-6)
    assert syntax in got.meta["transfer_syntax"]


def test_dicom_without_preamble_and_multiframe():
    g = _gradient()
    bare = _dicom(g, preamble=False)
    assert bare[128:132] != b"DICM"
    np.testing.assert_allclose(read_image(bare).pixels[0], g[0] / 4095, atol=1e-6)
    frames = np.stack([g, g[:, ::-1], g])  # (3, H, W): frame 0 increases left to right
    img = read_image(_dicom(frames, NumberOfFrames=3))
    assert img.pixels.shape == g.shape and img.pixels[0, -1] == 1 and img.meta["frames"] == 3
    assert any("3 frames" in w for w in cxr_warnings(img))


# ---------------------------------------------------------------- PNG / JPEG / colour
def _rgb_ramp(h=80, w=96) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)


def test_png_8bit_exact():
    a = (np.arange(80 * 96).reshape(80, 96) % 256).astype(np.uint8)
    img = read_image(_png(a))
    np.testing.assert_array_equal(img.pixels, a / np.float32(255))
    assert img.meta["format"] == "png" and img.meta["bits"] == 8 and not img.meta["is_color"]


def test_png_16bit_minmax(tmp_path):
    a = _gradient(hi=60000) + 1000  # 1000..61000
    path = tmp_path / "x16.png"
    Image.fromarray(a).save(path)  # mode I;16
    img = read_image(path)
    assert img.meta["bits"] == 16
    np.testing.assert_allclose(img.pixels[0], (a[0] - 1000) / 60000, atol=1e-6)


def test_jpeg_gray_close():
    a = np.tile(np.linspace(0, 255, 96), (80, 1)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    img = read_image(buf.getvalue())
    assert img.meta["format"] == "jpeg"
    assert np.abs(img.pixels - a / 255).mean() < 0.01


def test_rgb_luma_and_colour_flag():
    rgb = _rgb_ramp()
    img = read_image(_png(rgb))
    expect = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255  # ITU-R 601
    np.testing.assert_array_equal(img.pixels, expect)
    assert img.meta["is_color"] and img.meta["color_fraction"] > 0.5
    grey3 = np.repeat(rgb[..., :1], 3, axis=2)  # channels equal -> not colour
    assert not read_image(_png(grey3)).meta["is_color"]


def test_rgba_composited_over_black():
    rgba = np.zeros((80, 96, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :32, 3], rgba[:, 32:64, 3], rgba[:, 64:, 3] = 0, 255, 128
    px = read_image(_png(rgba)).pixels
    assert px[0, 0] == 0                                  # transparent -> black, not white
    assert px[0, 40] == pytest.approx(200 / 255, abs=1e-6)
    assert px[0, 70] == pytest.approx(200 * 128 / 255 / 255, abs=2 / 255)


def test_palette_png():
    idx = (np.arange(80 * 96).reshape(80, 96) % 4).astype(np.uint8)
    im = Image.fromarray(idx).convert("P")  # indices 0..3 kept, palette set below
    im.putpalette([0, 0, 0, 80, 80, 80, 160, 160, 160, 250, 250, 250] + [0] * (252 * 3))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    px = read_image(buf.getvalue()).pixels
    np.testing.assert_allclose(px, np.array([0, 80, 160, 250])[idx] / 255, atol=1e-6)


def test_exif_rotated_jpeg_is_upright():
    upright = np.full((120, 80), 30, np.uint8)  # portrait, bright block top-left
    upright[:30, :20] = 230
    stored = Image.fromarray(upright).rotate(90, expand=True)  # what a sideways camera saves
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    img = read_image(buf.getvalue())
    assert img.pixels.shape == (120, 80) and img.meta["exif_orientation"] == 6
    assert img.pixels[:30, :20].mean() > 0.8 and img.pixels[-30:, -20:].mean() < 0.2


def test_array_and_pil_inputs():
    a = np.linspace(0, 1, 80 * 96, dtype=np.float32).reshape(80, 96)
    np.testing.assert_array_equal(read_image(a).pixels, a)
    np.testing.assert_allclose(read_image(Image.fromarray((a * 255).astype(np.uint8))).pixels, a, atol=1 / 255)


# ---------------------------------------------------------------- model input
def test_crop_vs_pad_non_square():
    a = np.full((300, 600), 0.5, np.float32)  # wide: H 300, W 600
    a[100:200, 250:350] = 1.0                 # centre block
    a[:, :50] = 0.9                           # left edge bar
    crop = to_model_input(a, 256, "crop")     # -> 256 x 512, keep columns 128..384
    pad = to_model_input(a, 256, "pad")       # -> 128 x 256, black bars top and bottom
    assert crop.shape == pad.shape == (256, 256) and crop.dtype == pad.dtype == np.float32
    assert crop[128, 128] == pytest.approx(1.0, abs=0.02)          # centre kept
    assert np.abs(crop[:, :20] - 0.5).max() < 0.02                  # left bar cropped away
    assert pad[:60].max() == 0 and pad[-60:].max() == 0              # black on the short axis
    assert pad[128, 5] == pytest.approx(0.9, abs=0.02) and pad[128, 128] == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError):
        to_model_input(a, 256, "stretch")


def test_crop_matches_dataset_processing():
    # the shared dataset: PIL Lanczos on 8-bit L so the shorter side is 256, then centre crop
    rng = np.random.default_rng(1)
    a8 = (rng.random((384, 512)) * 255).astype(np.uint8)
    ref = Image.fromarray(a8).resize((341, 256), Image.Resampling.LANCZOS)
    ref = np.asarray(ref)[:, 42:298] / 255.0
    ours = to_model_input(read_image(a8).pixels)
    np.testing.assert_array_equal(ours, ref.astype(np.float32))  # bit for bit
    same = np.asarray(ref, np.float32)
    np.testing.assert_array_equal(to_model_input(same), same)  # already 256x256: untouched


# ---------------------------------------------------------------- bad input
def _fake_png_header(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _no_pixel_dicom() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_dicom(_gradient())))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _undecodable_dicom() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_dicom(_gradient(hi=255).astype(np.uint8), bits=8)))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9"])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


BAD_INPUTS = {
    "empty": (lambda p: b"", "empty (0 bytes)"),
    "truncated_png": (lambda p: _png(_rgb_ramp(200, 200))[:400], "damaged or incomplete"),
    "random_bytes": (lambda p: np.random.default_rng(0).bytes(5000), "not an image"),
    "text_file": (lambda p: (p / "notes.txt").write_text("Patient seen today.\n" * 50) and p / "notes.txt",
                  "contains text"),
    "missing_path": (lambda p: p / "nope.png", "Could not find"),
    "dicom_no_pixels": (lambda p: _no_pixel_dicom(), "no image (no Pixel Data)"),
    "dicom_truncated": (lambda p: _dicom(_gradient())[:-3000], "incomplete or damaged"),
    "dicom_undecodable": (lambda p: _undecodable_dicom(), "JPEG Baseline (Process 1) (1.2.840.10008.1.2.4.50)"),
    "tiny": (lambda p: _png(np.arange(100, dtype=np.uint8).reshape(10, 10)), "10×10"),
    "png_bomb": (lambda p: _fake_png_header(20000, 20000), "400 megapixels"),  # Pillow's guard
    "png_large": (lambda p: _fake_png_header(9000, 8000), "72 megapixels"),     # ours
    "dicom_huge": (lambda p: _dicom(_gradient(), Rows=30000, Columns=30000), "900 megapixels"),
    "constant": (lambda p: _png(np.full((100, 100), 7, np.uint8)), "blank"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_helpful_error(name, tmp_path):
    make, phrase = BAD_INPUTS[name]
    src = make(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(ImageLoadError) as e:
            read_image(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(e.value, ValueError)
    assert phrase in str(e.value), str(e.value)
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB allocated rejecting {name}"


# ---------------------------------------------------------------- writing
def _test_image(h=256, w=256) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((np.sin(x / 9.0) * np.cos(y / 13.0) + 1) / 2).astype(np.float32)  # (h, w) in [0, 1]


def _outside_label(shape) -> np.ndarray:
    x0, y0, x1, y1 = synthetic_label_box(shape)
    keep = np.ones(shape, bool)
    keep[y0:y1, x0:x1] = False
    return keep


def test_mark_synthetic_new_array_with_label():
    img = np.full((256, 256), 0.5, np.float32)
    out = mark_synthetic(img)
    assert out is not img and np.all(img == 0.5)
    x0, y0, x1, y1 = synthetic_label_box(img.shape)
    assert x0 < 20 and y0 < 20 and 40 < x1 < 200 and 10 < y1 < 60  # small, top-left
    box = out[y0:y1, x0:x1]
    assert (box == 0).mean() > 0.4 and (box > 0.9).mean() > 0.05  # white text on black
    np.testing.assert_array_equal(out[_outside_label(img.shape)], 0.5)


def test_write_dicom_markers_and_roundtrip(tmp_path):
    img = _test_image(256, 240)
    settings = {"seed": 3, "guidance": 7.5, "steps": 50}
    path = write_dicom(img, tmp_path / "out.dcm", description="Larger right pleural effusion.",
                       settings=settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dcm"]  # no temp files left
    m = read_dicom_markers(path)
    assert m["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.7"
    assert "DERIVED" in m["ImageType"] and m["ConversionType"] == "SYN" and m["Modality"] == "OT"
    assert "synthetic" in m["DerivationDescription"].lower() and m["BurnedInAnnotation"] == "YES"
    assert "not for diagnosis" in m["SeriesDescription"] and "pleural effusion" in m["ImageComments"]
    assert json.loads(m["ImageComments"].split("Settings: ", 1)[1]) == settings
    assert m["PatientName"] == "" and m["PatientID"] == ""
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and ds.BitsStored == 8
    back = read_image(path)
    keep = _outside_label(img.shape)
    assert np.abs(back.pixels - img)[keep].max() <= 0.5 / 255 + 1e-6
    assert np.abs(back.pixels - img)[~keep].max() > 0.2  # the label is really there
    assert back.meta["synthetic"] and any("SYNTHETIC" in w for w in cxr_warnings(back))


def test_write_dicom_never_copies_identifiers(tmp_path, rg1):
    src = pydicom.dcmread(RG1)
    path = write_dicom(to_model_input(rg1.pixels), tmp_path / "s.dcm", description="x" * 5000,
                       settings={"s": "y" * 20000}, source=rg1)
    raw = path.read_bytes()
    for kw in ("PatientName", "PatientID", "InstitutionName", "StudyInstanceUID", "SOPInstanceUID"):
        value = str(src.get(kw, ""))
        assert value and value.encode() not in raw, kw
    ds = pydicom.dcmread(path)
    assert "ViewPosition" not in ds and ds.BodyPartExamined == "CHEST"
    assert len(ds.DerivationDescription.encode()) <= 1024 and len(ds.ImageComments.encode()) <= 10240
    named = write_dicom(_test_image(), tmp_path / "n.dcm", description="d", include_patient=True,
                        patient_name="Doe^Jane", patient_id="12345", burn_in=False)
    m = read_dicom_markers(named)
    assert (m["PatientName"], m["PatientID"], m["BurnedInAnnotation"]) == ("Doe^Jane", "12345", "NO")


def test_save_png_text_label_atomic(tmp_path):
    img = _test_image()
    marked = save_png(img, tmp_path / "a.png", description="seed 3")
    plain = save_png(img, tmp_path / "b.png", burn_in=False)
    raw = save_png(img, tmp_path / "c.png", synthetic=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]
    with Image.open(marked) as im:
        assert im.mode == "L" and im.info["Software"] == "BiomedJourney"
        assert "SYNTHETIC" in im.info["Description"] and "not for diagnosis" in im.info["Description"]
        assert im.info["Description"].endswith("seed 3")
    with Image.open(raw) as im:
        assert "Description" not in im.info
    a, b = read_image(marked), read_image(plain)
    x0, y0, x1, y1 = synthetic_label_box(img.shape)
    assert np.abs(a.pixels[y0:y1, x0:x1] - b.pixels[y0:y1, x0:x1]).max() > 0.2  # visible label
    keep = _outside_label(img.shape)
    np.testing.assert_array_equal(a.pixels[keep], b.pixels[keep])
    assert np.abs(b.pixels - img).max() <= 0.5 / 255 + 1e-6
    assert a.meta["synthetic"] and not read_image(raw).meta["synthetic"]


# ---------------------------------------------------------------- warnings
def test_cxr_warnings(rg1):
    assert cxr_warnings(rg1) == []
    lateral = read_image(_dicom(_gradient(), ViewPosition="LL", Modality="CR"))
    assert any("lateral" in w for w in cxr_warnings(lateral))
    ct = read_image(_dicom(_gradient(), Modality="CT"))
    assert any("CT" in w for w in cxr_warnings(ct))
    photo = read_image(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    assert any("colour" in w for w in cxr_warnings(photo))
    wide = read_image(_png((_test_image(100, 400) * 255).astype(np.uint8)))
    assert any("unusual shape" in w for w in cxr_warnings(wide))
    flat = read_image(_png((100 + _test_image(200, 200) * 10).astype(np.uint8)))
    assert any("low contrast" in w for w in cxr_warnings(flat))
    assert cxr_warnings(read_image(_png((_test_image() * 255).astype(np.uint8)))) == []
