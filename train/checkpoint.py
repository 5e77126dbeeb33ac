"""Atomic, pickle-free training checkpoints for exact resume.

A checkpoint is a folder `step-<N>/` holding safetensors files (models, EMA,
optimizer tensors, torch RNG states) and `state.json` (step, optimizer
param_groups, numpy/python RNG states, anything else JSON-able). It is written
to a temporary folder and renamed into place (``biomedjourney.atomic.atomic_write``),
so a crash never leaves a half-written checkpoint; `latest` resolves to the highest
complete step.
This is for resuming only; the export for inference is a pipeline folder.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from biomedjourney.atomic import atomic_write


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generators: dict[str, torch.Generator] | None = None) -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    for name, g in (generators or {}).items():
        tensors[f"gen_{name}"] = g.get_state()
    np_state = np.random.get_state()
    meta = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": json.loads(json.dumps(random.getstate(), default=list))}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    for name, g in (generators or {}).items():
        if f"gen_{name}" in tensors:
            g.set_state(tensors[f"gen_{name}"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(root: str | Path, step: int, *, models: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None,
                    extra: dict | None = None, keep: int = 2, rank: int = 0) -> Path:
    """Write `root/step-<step>` atomically (call on the main process; RNG of `rank` saved)."""
    root = Path(root)

    def write(tmp: str) -> None:
        tmp = Path(tmp)
        for name, m in models.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()},
                      tmp / f"{name}.safetensors")
        meta: dict = {"step": step, "extra": extra or {}}
        if optimizer is not None:
            t, m = _flatten_optimizer(optimizer)
            save_file(t, tmp / "optimizer.safetensors")
            meta["optimizer"] = m
        t, m = rng_state(generators)
        save_file(t, tmp / f"rng_rank{rank}.safetensors")
        meta["rng"] = m
        (tmp / "state.json").write_text(json.dumps(meta))

    final = atomic_write(root / f"step-{step:08d}", write, directory=True)
    for old in sorted(root.glob("step-*"))[:-keep] if keep else []:
        # renamed first (atomic): a crash mid-delete leaves a hidden folder, never a half-deleted step-* that
        # `latest` could pick
        trash = old.with_name(f".{old.name}.deleting")
        old.rename(trash)
    for trash in root.glob(".step-*.deleting"):  # this prune's, and any a crash left behind
        shutil.rmtree(trash, ignore_errors=True)
    return final


def find_checkpoint(root: str | Path, which: str = "latest") -> Path | None:
    """`latest` -> newest complete `step-*` folder under root; otherwise a path."""
    if which != "latest":
        return Path(which)
    steps = sorted(p for p in Path(root).glob("step-*") if (p / "state.json").is_file())
    return steps[-1] if steps else None


def load_checkpoint(path: str | Path, *, models: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None, rank: int = 0) -> dict:
    """Restore models/optimizer/RNG in place; returns state.json (step, extra)."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    for name, m in models.items():
        m.load_state_dict(load_file(path / f"{name}.safetensors"))
    if optimizer is not None and "optimizer" in meta:
        optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta["optimizer"]))
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(rng_file), meta["rng"], generators)
    return meta
