"""Train the small lung segmenter (background / patient-right lung / patient-left lung) on CPU.

    python train/train_segmenter.py --out assets/segmenter --minutes 20
    python train/train_segmenter.py --out assets/segmenter --minutes 10 --resume latest

Data: the V7 Labs lung masks shipped inside the installed torchxrayvision wheel
(`<torchxrayvision>/data/semantic_masks_v7labs_lungs.zip`, CC BY 4.0, drawn on
covid-chestxray-dataset images) matched by file name to the shared dataset's images
(`images.csv` column `source_path`). The zip is read in place, never copied. Masks are at the
original image size; they get the dataset's own geometry (shorter side 256, Lanczos, centre crop
256x256). Value 255 = lung (both lungs, one class), 127 = V7's "Ignore" class (devices, markup):
ignored by the loss. The two lungs are split by connected components; the component on the
IMAGE's left is the PATIENT's right lung (`biomedjourney.anatomy.image_half`).

Split by patient with `biomedjourney.dataset.split_of`; only training-split images whose licence
allows derivatives (`licence_ok_for_weights`) train the shipped weights.

Checkpoints: atomic, pickle-free (`train.checkpoint`) in --work (default work/runs/segmenter);
`--resume latest` continues. Export to --out: model.safetensors (fp16), config.json, metrics.json.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import sys
import time
import zipfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `train` and `biomedjourney` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image
from scipy import ndimage

from biomedjourney.anatomy import SEGMENTER_CLASSES, build_segmenter_model, split_lungs_by_side
from biomedjourney.atomic import atomic_write, write_text
from biomedjourney.dataset import data_root, licence_ok_for_weights, load_images, split_of
from biomedjourney.imaging import load_model_input, to_model_input, to_uint8

ZIP_NAME = "semantic_masks_v7labs_lungs.zip"
SIZE = 256  # the dataset / model-input frame
MASKS_LICENCE = "CC BY 4.0 (V7 Labs COVID-19 X-ray dataset annotations, github.com/v7labs/covid-19-xray-dataset)"


def masks_zip_path() -> Path:
    """The V7 lung-mask zip inside the installed torchxrayvision package (found without importing it)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        raise SystemExit("torchxrayvision is not installed (pip install torchxrayvision==1.5.7): it ships the masks")
    p = Path(os.path.dirname(spec.origin)) / "data" / ZIP_NAME
    if not p.is_file():
        raise SystemExit(f"{p} not found in the installed torchxrayvision")
    return p


def mask_to_frame(mask: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Boolean (H, W) mask at the original image size -> (size, size) bool in the model-input frame: the
    geometry of ``imaging.to_model_input`` (shorter side ``size``, Lanczos, centre crop), then >= half."""
    return to_model_input(mask.astype(np.float32), size) >= 0.5


def split_lungs(lung: np.ndarray, min_frac: float = 0.02) -> np.ndarray | None:
    """Binary both-lungs mask -> labels 0 bg / 1 patient-right / 2 patient-left, or None if not two lungs."""
    right, left = split_lungs_by_side(lung, min_frac)
    if right.sum() < min_frac * lung.size or left.sum() < min_frac * lung.size:
        return None
    out = np.zeros(lung.shape, np.uint8)
    out[right] = 1
    out[left] = 2
    return out


def build_data(root: Path | None, cache: Path) -> dict:
    """Match masks to dataset images; returns arrays + per-image info (cached as .npz + .json)."""
    zpath = masks_zip_path()
    zsha = hashlib.sha256(zpath.read_bytes()).hexdigest()
    meta_path, arr_path = cache / "data.json", cache / "data.npz"
    if meta_path.is_file() and arr_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("zip_sha256") == zsha:
            arrs = np.load(arr_path)
            return {"meta": meta, "images": arrs["images"], "labels": arrs["labels"]}
    rows = load_images(root)
    by_stem: dict[str, object] = {}
    for r in rows.values():
        if r.source not in ("ieee8023", "hannover"):
            continue
        by_stem[r.path.stem.split("_", 1)[1].lower()] = r
    z = zipfile.ZipFile(zpath)
    imgs, labs, info, skipped = [], [], [], {"no_image": 0, "empty_mask": 0, "not_two_lungs": 0}
    for name in sorted(n for n in z.namelist() if not n.endswith("/")):
        stem = Path(name).stem.lower()
        row = by_stem.get(stem)
        if row is None:
            skipped["no_image"] += 1
            continue
        m = np.asarray(Image.open(io.BytesIO(z.read(name))).convert("L"))
        if not (m == 255).any():
            skipped["empty_mask"] += 1
            continue
        lung, ign = mask_to_frame(m == 255), mask_to_frame(m == 127)
        lung = ndimage.binary_opening(lung, iterations=1)
        lab = split_lungs(lung)
        if lab is None:
            skipped["not_two_lungs"] += 1
            continue
        lab[ign & (lab == 0)] = 255
        imgs.append(to_uint8(load_model_input(row.path, SIZE)))
        labs.append(lab)
        info.append({"image_id": row.image_id, "patient_id": row.patient_id, "source": row.source,
                     "split": split_of(row.patient_id), "licence_ok": licence_ok_for_weights(row.license),
                     "mask": name, "mask_sha256": hashlib.sha256(z.read(name)).hexdigest()})
    h = hashlib.sha256()
    for i in info:
        h.update(f"{i['image_id']}:{i['mask_sha256']}\n".encode())
    meta = {"zip": str(zpath.name), "zip_sha256": zsha, "data_sha256": h.hexdigest(), "skipped": skipped,
            "items": info}
    def write_arrays(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
            np.savez_compressed(f, images=np.stack(imgs), labels=np.stack(labs))

    atomic_write(arr_path, write_arrays)
    write_text(meta_path, json.dumps(meta, indent=1))
    return {"meta": meta, "images": np.stack(imgs), "labels": np.stack(labs)}


# ------------------------------------------------------------------------------ augmentation
def augment(x, y, g):
    """x (B,1,256,256) float [0,1], y (B,256,256) long -> augmented copies (torch, CPU)."""
    import torch
    import torch.nn.functional as F
    b = x.shape[0]
    ang = (torch.rand(b, generator=g) * 2 - 1) * math.radians(10)
    sc = torch.exp((torch.rand(b, generator=g) * 2 - 1) * math.log(1.15))
    sx, sy = [(torch.rand(b, generator=g) * 2 - 1) * 0.08 for _ in range(2)]
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, sx], 1), torch.stack([sin, cos, sy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    yf = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    y = yf[:, 0].long()
    # intensity: gamma, contrast/brightness, low contrast (hannover-like), blur, noise
    gamma = torch.exp((torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * math.log(1.8))
    x = x.clamp(0, 1) ** gamma
    lo = torch.rand(b, 1, 1, 1, generator=g) * 0.25
    hi = 1 - torch.rand(b, 1, 1, 1, generator=g) * 0.25
    low = torch.rand(b, 1, 1, 1, generator=g) < 0.3  # compress to a narrow range
    lo = torch.where(low, 0.2 + torch.rand(b, 1, 1, 1, generator=g) * 0.2, lo)
    hi = torch.where(low, lo + 0.25 + torch.rand(b, 1, 1, 1, generator=g) * 0.2, hi)
    x = lo + (hi - lo) * x
    if torch.rand(1, generator=g).item() < 0.4:
        k = torch.tensor([1, 4, 6, 4, 1], dtype=x.dtype)
        k = (k[:, None] * k[None, :]) / 256
        x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k[None, None])
    noise = torch.rand(b, 1, 1, 1, generator=g) * 0.04
    x = x + noise * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1), y


def loss_fn(logits, y):
    import torch
    import torch.nn.functional as F
    ce = F.cross_entropy(logits, y, ignore_index=255)
    valid = (y != 255)
    p = logits.softmax(1)
    dice = 0.0
    for c in (1, 2):
        t = ((y == c) & valid).float()
        pc = p[:, c] * valid.float()
        inter = (pc * t).sum((1, 2))
        dice = dice + (1 - (2 * inter + 1) / (pc.sum((1, 2)) + t.sum((1, 2)) + 1)).mean()
    return ce + dice / 2


def dice_scores(pred: np.ndarray, y: np.ndarray) -> dict:
    """pred, y (N, H, W) labels (255 in y ignored) -> mean per-image Dice per lung and for both lungs."""
    out = {}
    valid = y != 255
    for name, cs in (("right_lung", (1,)), ("left_lung", (2,)), ("lungs", (1, 2))):
        d = []
        for p_, t_, v_ in zip(pred, y, valid):
            pm, tm = np.isin(p_, cs) & v_, np.isin(t_, cs) & v_
            s = pm.sum() + tm.sum()
            d.append(1.0 if s == 0 else 2 * (pm & tm).sum() / s)
        out[name] = float(np.mean(d)) if d else float("nan")
    return out


def predict(model, images: np.ndarray, input_size: int, batch: int = 16) -> np.ndarray:
    """uint8 (N,256,256) -> argmax labels (N,256,256) (logits upsampled to 256)."""
    import torch
    import torch.nn.functional as F
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).float()[:, None] / 255
            xi = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
            lo = model((xi - 0.5) / 0.25)
            lo = F.interpolate(lo, size=x.shape[-2:], mode="bilinear", align_corners=False)
            out.append(lo.argmax(1).numpy().astype(np.uint8))
    return np.concatenate(out)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("assets/segmenter"))
    ap.add_argument("--work", type=Path, default=Path("work/runs/segmenter"))
    ap.add_argument("--data", default=None, help="dataset folder (default: $BIOMEDJOURNEY_DATA or ../shared/data/cxr)")
    ap.add_argument("--minutes", type=float, required=True, help="wall-clock budget of this call")
    ap.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--input-size", type=int, default=192)
    ap.add_argument("--encoder", default="tu-mobilenetv3_small_100")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--seed", type=int, default=0)
    return ap


def split_masks(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks over data's items: train (train split AND licence ok for weights), val (val split)."""
    items = data["meta"]["items"]
    tr = np.array([i["split"] == "train" and i["licence_ok"] for i in items])
    va = np.array([i["split"] == "val" for i in items])
    print(f"{len(items)} masked images: {tr.sum()} train (licence ok), {va.sum()} val "
          f"({sum(i['split'] == 'train' and not i['licence_ok'] for i in items)} train images left out: licence); "
          f"skipped {data['meta']['skipped']}", flush=True)
    return tr, va


class SegmenterRun:
    """The model, optimizer (AdamW, 100-step warm-up then cosine to 0), augmentation generator and step count
    of a training run; checkpoints (atomic, train.checkpoint) in --work/checkpoints and exact resume."""

    def __init__(self, a: argparse.Namespace, n_train: int, command: str, t_start: float):
        import torch
        self.a, self.t_start = a, t_start
        self.arch = {"library": "segmentation_models_pytorch", "class": "Unet", "encoder_name": a.encoder,
                     "decoder_channels": [64, 32, 24, 16, 8], "in_channels": 1, "classes": len(SEGMENTER_CLASSES)}
        torch.manual_seed(a.seed)
        self.model = build_segmenter_model(self.arch)
        self.steps_per_epoch = math.ceil(n_train / a.batch_size)
        self.total = a.epochs * self.steps_per_epoch
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=a.lr, weight_decay=1e-4)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)
        self.g = torch.Generator().manual_seed(a.seed)
        self.step, self.seconds_before, self.commands = 0, 0.0, [command]
        self.ckdir = a.work / "checkpoints"

    def lr_factor(self, s: int) -> float:  # 100-step warm-up, then cosine to 0 at `total`
        return min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, self.total) / self.total))

    def resume(self, which: str) -> None:
        from train.checkpoint import find_checkpoint, load_checkpoint
        ck = find_checkpoint(self.ckdir, which)
        if ck is None:
            print(f"no checkpoint in {self.ckdir}; starting fresh", flush=True)
            return
        st = load_checkpoint(ck, models={"model": self.model}, optimizer=self.opt, generators={"aug": self.g})
        self.step = st["step"]
        self.seconds_before = st["extra"].get("seconds", 0.0)
        self.commands = st["extra"].get("commands", ["(earlier run)"]) + self.commands
        self.sched.last_epoch = self.step  # the next sched.step() gives the lr of step + 1
        for group in self.opt.param_groups:
            group["lr"] = group["initial_lr"] * self.lr_factor(self.step)
        print(f"resumed {ck} at step {self.step}/{self.total}", flush=True)

    def seconds(self) -> float:
        """Training wall time over all calls (resumed runs included)."""
        return self.seconds_before + time.time() - self.t_start

    def checkpoint(self) -> None:
        from train.checkpoint import save_checkpoint
        save_checkpoint(self.ckdir, self.step, models={"model": self.model}, optimizer=self.opt,
                        generators={"aug": self.g},
                        extra={"seconds": self.seconds(), "arch": self.arch, "commands": self.commands,
                               "input_size": self.a.input_size})

    def train_step(self, xtr, ytr) -> float:
        """One optimizer step on this step's batch (a fixed permutation per epoch), augmented, at input_size."""
        import torch
        import torch.nn.functional as F
        a = self.a
        self.model.train()
        epoch, k = divmod(self.step, self.steps_per_epoch)
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(a.seed * 1000 + epoch))
        idx = perm[k * a.batch_size:(k + 1) * a.batch_size]
        x, y = augment(xtr[idx], ytr[idx], self.g)
        x = F.interpolate(x, size=(a.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        y = F.interpolate(y[:, None].float(), size=(a.input_size,) * 2, mode="nearest")[:, 0].long()
        loss = loss_fn(self.model((x - 0.5) / 0.25), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.step += 1
        return loss.item()

    def run(self, xtr, ytr, deadline: float) -> None:
        """Train until the schedule ends or 30 s before the deadline; a checkpoint every 3 minutes and at the end."""
        last_ck, losses = time.time(), []
        while self.step < self.total and time.time() < deadline - 30:
            losses.append(self.train_step(xtr, ytr))
            if self.step % self.steps_per_epoch == 0:
                print(f"epoch {self.step // self.steps_per_epoch}/{self.a.epochs} step {self.step} loss "
                      f"{np.mean(losses):.4f} lr {self.sched.get_last_lr()[0]:.2e} {time.time() - self.t_start:.0f}s",
                      flush=True)
                losses = []
            if time.time() - last_ck > 180:
                self.checkpoint()
                last_ck = time.time()
        self.checkpoint()


def validate(model, data: dict, va: np.ndarray, input_size: int) -> dict:
    """Val Dice of the raw argmax and after segment()'s clean-up, and the images whose prediction segment()'s
    plausibility check would reject (they fall back to the atlas)."""
    from biomedjourney.anatomy import _clean, plausibility_problems
    items, images = data["meta"]["items"], data["images"][va]
    pred = predict(model, images, input_size)
    post, fallbacks = np.zeros_like(pred), []
    for i, p_ in enumerate(pred):  # as segment() does it: largest component / holes / smoothing, then the check
        r, l = _clean(p_ == 1), _clean(p_ == 2)
        post[i][r], post[i][l] = 1, 2
        if plausibility_problems(r, l, images[i].astype(np.float32) / 255):
            fallbacks.append(items[int(np.nonzero(va)[0][i])]["image_id"])
    return {"dice": dice_scores(pred, data["labels"][va]), "dice_post": dice_scores(post, data["labels"][va]),
            "fallbacks": fallbacks, "n_patients": len({i["patient_id"] for i, v in zip(items, va) if v})}


def export(run: SegmenterRun, data: dict, tr: np.ndarray, va: np.ndarray, v: dict, seconds: float) -> None:
    """--out: model.safetensors (fp16), config.json, metrics.json, each written atomically."""
    import torch
    from safetensors.torch import save_file
    a, model, done = run.a, run.model, run.step >= run.total
    sd = {k: (t.detach().half() if t.is_floating_point() else t.detach()).contiguous()
          for k, t in model.state_dict().items()}

    def write_weights(tmp: str) -> None:
        save_file(sd, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors writes 0600

    atomic_write(a.out / "model.safetensors", write_weights)
    n_params = sum(p.numel() for p in model.parameters())
    config = {
        "architecture": run.arch, "parameters": n_params, "dtype": "float16",
        "input_size": a.input_size, "frame_size": SIZE,
        "normalization": {"mean": 0.5, "std": 0.25, "note": "x in [0,1] from imaging.to_model_input(size=256), "
                          "resized to input_size (bilinear, antialias), then (x-mean)/std"},
        "classes": list(SEGMENTER_CLASSES),
        "class_note": "sides are the PATIENT's: right_lung is on the image's left (anatomy.PATIENT_RIGHT_ON_IMAGE)",
        "training": {"complete": done, "steps": run.step, "total_steps": run.total, "epochs": a.epochs,
                     "batch_size": a.batch_size, "lr": a.lr, "seconds": round(seconds, 1), "threads": a.threads,
                     "seed": a.seed, "device": "cpu", "torch": torch.__version__,
                     "segmentation_models_pytorch": __import__("segmentation_models_pytorch").__version__,
                     "python": platform.python_version(),
                     "commands": run.commands},
        "data": {"masks": f"torchxrayvision wheel: torchxrayvision/data/{ZIP_NAME}", "masks_licence": MASKS_LICENCE,
                 "zip_sha256": data["meta"]["zip_sha256"], "data_sha256": data["meta"]["data_sha256"],
                 "images": "shared CXR dataset (ieee8023 + hannover rows matched by source_path file name)",
                 "n_matched": len(data["meta"]["items"]), "n_train": int(tr.sum()), "n_val": int(va.sum()),
                 "skipped": data["meta"]["skipped"],
                 "split": "biomedjourney.dataset.split_of(patient_id); train images need licence_ok_for_weights"},
    }
    write_text(a.out / "config.json", json.dumps(config, indent=2) + "\n")
    metrics = {"split": "val", "n_images": int(va.sum()), "n_patients": v["n_patients"],
               "dice": {k: round(x, 4) for k, x in v["dice"].items()},
               "dice_postprocessed": {k: round(x, 4) for k, x in v["dice_post"].items()},
               "atlas_fallbacks": {"n": len(v["fallbacks"]), "image_ids": v["fallbacks"]},
               "note": "mean per-image Dice at 256x256 (V7 'Ignore' pixels excluded), validation patients only; "
                       "dice = raw network argmax, dice_postprocessed = after segment()'s clean-up; "
                       "atlas_fallbacks = images segment()'s plausibility check would reject",
               "training_complete": done, "data_sha256": data["meta"]["data_sha256"]}
    write_text(a.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    mb = (a.out / "model.safetensors").stat().st_size / 1e6
    print(f"exported {a.out} ({mb:.2f} MB, {n_params / 1e6:.2f} M params, "
          f"{'complete' if done else f'step {run.step}/{run.total}: resume with --resume latest'})", flush=True)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    t_start = time.time()
    data = build_data(data_root(a.data), a.work / "cache")
    tr, va = split_masks(data)
    xtr = torch.from_numpy(data["images"][tr]).float()[:, None] / 255
    ytr = torch.from_numpy(data["labels"][tr].astype(np.int64))
    command = "python train/train_segmenter.py " + " ".join(sys.argv[1:] if argv is None else argv)
    run = SegmenterRun(a, len(xtr), command, t_start)
    if a.resume:
        run.resume(a.resume)
    run.run(xtr, ytr, deadline=t_start + a.minutes * 60)
    seconds = run.seconds()
    v = validate(run.model, data, va, a.input_size)
    print(f"val Dice {v['dice']} (post-processed {v['dice_post']}; {len(v['fallbacks'])} would fall back to the "
          f"atlas) on {va.sum()} images / {v['n_patients']} patients", flush=True)
    export(run, data, tr, va, v, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
