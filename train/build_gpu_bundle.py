"""The self-contained folder that the short GPU run (scripts/train_gpu_short.sh) trains from: there, no image
is read and no text-encoder weights are needed, only this folder and the repository.

    python train/prepare_data.py --source cxr --data "$BIOMEDJOURNEY_DATA" --out work/data/cxr-prep-l40 --limit 40
    python train/build_gpu_bundle.py --data work/data/cxr-prep-l40 --out work/gpu-bundle --download-wheels

OUT/
  bundle.json        what it holds: the preset, the text encoder's full spec (package version, weights sha256),
                     the autoencoder, row counts, the byte budget and every size
  stage1.csv         the chosen rows (train/manifest.py's format; the paths are those of this machine and
  stage2.csv           serve only as keys into the cache)
  cache.safetensors  latents of every image and embeddings of every text of both stages' rows, written by
                     train/train.py's build_cache (one file for both stages: stage 1's images are the
                     follow-ups of stage 2)
  vae/               the autoencoder, only when it is not a tracked file of this repository (the shipped
                     model's, the default, travels with the working tree)
  wheels/            the Python packages that the GPU machine's image lacks and training imports (WHEELS)

Size: the device tool carries at most 64 MiB: the working tree (tracked and untracked-not-ignored files)
plus the carried folders. ``--max-mib auto`` (default) gives the cache what is left of 64 MiB after the
tree, the wheels, a copied autoencoder and a margin. Stage-2 rows are taken in a seeded random order,
each with its follow-up's stage-1 row, while their latents and texts fit; rows whose text is longer than
--max-text-tokens are left out (the cache pads every text to the longest one).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `train` and `biomedjourney` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from biomedjourney.config import NO_CHANGE, write_json
from biomedjourney.resources import file_sha256
from biomedjourney.text_encoders import build_text_encoder
from train.config import load_config
from train.manifest import STAGE1_COLUMNS, STAGE2_COLUMNS, manifest_hash, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
MIB = 2 ** 20
CARRY_LIMIT = 64 * MIB   # the device tool's limit on what travels: working tree + carried paths
MARGIN = MIB // 2        # for the tree growing after the bundle is built, and the CSVs / JSON
CACHE = "cache.safetensors"
# Imported by training but missing from the GPU machine's image (/work/.library/device/KINDS.md lists
# what it has: torch, transformers, accelerate, safetensors, matplotlib, tensorboard, ...):
# diffusers (+ importlib_metadata, which it requires, + lazy-importer and zipp, which that requires: zipp is
# there, in a version not recorded) and pydicom (biomedjourney.imaging imports it). Versions: the ones
# installed here. scripts/train_gpu_short.sh installs them by name, so what is already there is kept.
WHEELS = ("diffusers", "pydicom", "importlib_metadata", "lazy-importer", "zipp")
GPU_PYTHON = "3.12"


def travelling_bytes(repo: Path = REPO) -> int:
    """Bytes of the files the device tool sends anyway: tracked and untracked-not-ignored (0 outside git)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    files = (repo / f for f in out.decode().split("\0") if f)
    return sum(f.stat().st_size for f in files if f.is_file())


def _tracked(path: Path) -> bool:
    try:
        rel = path.resolve().relative_to(REPO)
    except ValueError:
        return False
    return subprocess.run(["git", "-C", str(REPO), "ls-files", "--error-unmatch", str(rel)],
                          capture_output=True).returncode == 0


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def get_wheels(dest: Path, source: Path | None, download: bool) -> list[str]:
    """dest/*.whl: copied from ``source``, or downloaded (pure-Python wheels for the GPU's Python)."""
    dest.mkdir(parents=True, exist_ok=True)
    if source:
        for w in sorted(Path(source).glob("*.whl")):
            shutil.copy2(w, dest / w.name)
    if download:
        pins = []
        for name in WHEELS:
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                pass  # not needed by what is installed here (e.g. an importlib_metadata without lazy-importer)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", GPU_PYTHON, "--dest", str(dest), *pins], check=True)
    return sorted(w.name for w in dest.glob("*.whl"))


# ---------------------------------------------------------------- choosing rows
@dataclass
class Selection:
    """Rows chosen so far and what their cache will hold."""
    latent_bytes: int   # one latent: C x h x w fp16
    token_bytes: int    # one token of one text: D fp16 + 1 int8 mask
    tokens: dict        # text -> its token count
    images: set = field(default_factory=set)
    texts: set = field(default_factory=lambda: {"", NO_CHANGE})
    stage1: list = field(default_factory=list)
    stage2: list = field(default_factory=list)
    stage1_images: set = field(default_factory=set)

    def bytes_with(self, images: set, texts: set) -> int:
        im, tx = self.images | images, self.texts | texts
        return len(im) * (self.latent_bytes + 8) + len(tx) * (max(self.tokens[t] for t in tx) * self.token_bytes + 8)

    def add(self, s2: dict, s1: dict | None) -> None:
        self.stage2.append(s2)
        self.images |= {s2["prior"], s2["followup"]}
        self.texts.add(s2["text"])
        if s1 is not None and s1["image"] not in self.stage1_images:
            self.stage1.append(s1)
            self.stage1_images.add(s1["image"])
            self.texts.add(s1["text"])

    def try_add(self, s2: dict, s1: dict | None, budget: int, max_tokens: int) -> bool:
        texts = {s2["text"]} | ({s1["text"]} if s1 is not None else set())
        if max(self.tokens[t] for t in texts) > max_tokens:
            return False
        if self.bytes_with({s2["prior"], s2["followup"]}, texts) > budget:
            return False
        self.add(s2, s1)
        return True


def candidate_rows(data: Path, val_pairs: int) -> tuple[list[dict], list[dict], dict[str, dict]]:
    """Kept stage-2 train rows, the validation rows train.py will use (the first ``val_pairs`` kept ones),
    and the stage-1 row of every image."""
    s2 = [r for r in read_manifest(data / "stage2.csv") if r["kept"]]
    s1 = {r["image"]: r for r in read_manifest(data / "stage1.csv")}
    return ([r for r in s2 if r["split"] == "train"], [r for r in s2 if r["split"] == "val"][:val_pairs], s1)


def token_counts(text_spec, texts: set[str]) -> tuple[dict[str, int], int, dict]:
    """Real tokens per text, the encoder's width and its full spec (one encoder build)."""
    from train.train import encode_texts
    te = build_text_encoder(text_spec)
    order = sorted(texts)
    _, mask = encode_texts(te, order)
    return {t: int(m.sum()) for t, m in zip(order, mask)}, te.dim, te.spec()


def choose_rows(train2: list[dict], val2: list[dict], s1: dict[str, dict], sel: Selection, budget: int,
                max_tokens: int, seed: int) -> Selection:
    """Validation rows first (always), then train rows in a seeded random order while they fit."""
    for r in val2:
        sel.add(r, s1.get(r["followup"]))
    order = list(train2)
    random.Random(seed).shuffle(order)
    for r in order:
        sel.try_add(r, s1.get(r["followup"]), budget, max_tokens)
    return sel


# ---------------------------------------------------------------- the bundle
def build_bundle(data: Path, out: Path, config: str = "demo-gpu", vae: Path | None = None,
                 wheels_from: Path | None = None, download_wheels: bool = False, max_mib: float | None = None,
                 max_text_tokens: int = 32, seed: int = 0, device: str = "cpu") -> dict:
    from diffusers import AutoencoderKL

    from train.train import build_cache, training_rows
    cfg = load_config(config)
    if vae is None:
        from biomedjourney.pipeline import default_model_path
        vae = default_model_path() / "vae"
    vae = Path(vae)
    out.mkdir(parents=True, exist_ok=True)
    wheels = get_wheels(out / "wheels", wheels_from, download_wheels)
    vae_in_repo = _tracked(vae / "diffusion_pytorch_model.safetensors")
    if not vae_in_repo:
        shutil.rmtree(out / "vae", ignore_errors=True)
        shutil.copytree(vae, out / "vae")
    tree = travelling_bytes()
    fixed = tree + folder_bytes(out / "wheels") + folder_bytes(out / "vae") + MARGIN
    budget = int(max_mib * MIB) if max_mib else CARRY_LIMIT - fixed
    if budget <= 0:
        raise SystemExit(f"nothing left for the cache: tree {tree / MIB:.2f} MiB + wheels + margin >= 64 MiB")

    train2, val2, s1 = candidate_rows(data, cfg.stage2.val_pairs)
    texts = {"", NO_CHANGE} | {r["text"] for r in train2 + val2} | \
            {s1[r["followup"]]["text"] for r in train2 + val2 if r["followup"] in s1}
    tokens, dim, text_spec = token_counts(cfg.model.text_encoder, texts)
    ae = AutoencoderKL.from_pretrained(vae).eval().requires_grad_(False)
    h = cfg.model.resolution // 2 ** (len(ae.config.block_out_channels) - 1)
    sel = choose_rows(train2, val2, s1, Selection(ae.config.latent_channels * h * h * 2, 2 * dim + 1, tokens),
                      budget, max_text_tokens, seed)
    write_manifest(sel.stage1, out / "stage1.csv", STAGE1_COLUMNS)
    write_manifest(sel.stage2, out / "stage2.csv", STAGE2_COLUMNS)
    rows = [r for stage in (1, 2) for split in ("train", "val") for r in training_rows(out, stage, True, split)]
    (out / CACHE).unlink(missing_ok=True)
    cache = build_cache(rows, ae.to(device), cfg.model.text_encoder, cfg.model.resolution, out / CACHE, device)

    sizes = {"cache": (out / CACHE).stat().st_size, "latents": cache["latents"].nbytes,
             "text_embeddings": cache["text_emb"].nbytes + cache["text_mask"].nbytes,
             "csv": (out / "stage1.csv").stat().st_size + (out / "stage2.csv").stat().st_size,
             "vae": folder_bytes(out / "vae"), "wheels": folder_bytes(out / "wheels"), "tree": tree}
    total = tree + folder_bytes(out) + 4096  # + bundle.json
    info = {"config": cfg.name, "resolution": cfg.model.resolution, "text_encoder": text_spec,
            "vae": {"path": str(vae.resolve().relative_to(REPO)) if vae_in_repo else "vae",
                    "in": "repo" if vae_in_repo else "bundle",
                    "sha256": file_sha256(vae / "diffusion_pytorch_model.safetensors")},
            "data": str(data), "data_manifest_sha256": manifest_hash(data), "seed": seed,
            "rows": {"stage1": len(sel.stage1), "stage2": len(sel.stage2), "stage2_candidates": len(train2) + len(val2),
                     "images": int(len(cache["image_keys"])), "texts": int(len(cache["text_keys"])),
                     "text_tokens": int(cache["text_emb"].shape[1])},
            "max_text_tokens": max_text_tokens, "budget_bytes": budget, "sizes": sizes, "wheels": wheels,
            "carried_total_bytes": total, "fits_64_mib": total <= CARRY_LIMIT}
    write_json(info, out / "bundle.json")
    return info


def report(info: dict) -> str:
    s, m = info["sizes"], lambda b: f"{b / MIB:.2f} MiB"  # noqa: E731
    r = info["rows"]
    return (f"{r['stage2']} stage-2 rows (of {r['stage2_candidates']}), {r['stage1']} stage-1 rows, "
            f"{r['images']} latents, {r['texts']} texts x {r['text_tokens']} tokens\n"
            f"latents {m(s['latents'])}, text embeddings {m(s['text_embeddings'])} (cache file {m(s['cache'])}), "
            f"CSVs {m(s['csv'])}, vae {m(s['vae'])} ({info['vae']['in']}), wheels {m(s['wheels'])}, "
            f"working tree {m(s['tree'])}\n"
            f"carried in all: {m(info['carried_total_bytes'])} of 64 MiB: "
            f"{'fits' if info['fits_64_mib'] else 'DOES NOT FIT'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder written by train/prepare_data.py")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", default="demo-gpu", help="preset the GPU run trains (its resolution and text encoder)")
    ap.add_argument("--vae", type=Path, default=None, help="autoencoder folder (default: the shipped model's vae/)")
    ap.add_argument("--wheels", type=Path, default=None, help="copy the *.whl of this folder into OUT/wheels")
    ap.add_argument("--download-wheels", action="store_true", help=f"pip download {', '.join(WHEELS)} (the "
                    f"versions installed here) for Python {GPU_PYTHON} into OUT/wheels")
    ap.add_argument("--max-mib", type=float, default=None, help="cache budget (default: what 64 MiB leaves)")
    ap.add_argument("--max-text-tokens", type=int, default=32, help="leave out rows whose text is longer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    info = build_bundle(a.data, a.out, a.config, a.vae, a.wheels, a.download_wheels, a.max_mib, a.max_text_tokens,
                        a.seed, a.device)
    print(report(info))
    if not info["fits_64_mib"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
