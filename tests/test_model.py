"""The assembled CMPAGL model and its objective: gradients reach exactly the parameters each
loss term uses, the momentum encoders follow the EMA rule, the queues keep image ids."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from cmpagl.config import LossConfig, ModelConfig
from cmpagl.models.cmpagl import build_model
from cmpagl.models.momentum import FeatureQueue
from cmpagl.models.pretrained import load_pretrained
from cmpagl.objective import compute_losses

CAPTIONS = [
    "three white planes are parked left of the runway",
    "an airport with two planes",
    "a dense residential area with many houses",
    "a green meadow",
    "two ships are docked in the harbour",
    "a red car on the road",
]
IDS = torch.tensor([0, 0, 1, 2, 3, 4])  # image 0 appears twice, with two captions


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    cfg = ModelConfig(queue_size=16)
    cfg.gswin = dataclasses.replace(
        cfg.gswin, img_size=64, depths=(2, 2), num_heads=(2, 4), embed_dim=32
    )
    model = build_model(cfg)
    load_pretrained(model)  # MiniLM, as training starts
    return model


@pytest.fixture()
def model(base_model):
    return copy.deepcopy(base_model)


def images(n=6, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def run(model, cfg: LossConfig):
    model.zero_grad(set_to_none=True)
    loss, logs = compute_losses(
        model, images(), CAPTIONS, IDS, cfg, generator=torch.Generator().manual_seed(0)
    )
    loss.backward()
    return logs


def no_grad(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}


def test_features_shapes(model):
    img = model.encode_image(images(2))
    # 64 px / 4 = 16 tokens a side, one merge -> 8 x 8 = 64 tokens + the mean [CLS]
    assert img.tokens.shape == (2, 65, 64) and img.fusion.shape == (2, 65, 384)
    assert torch.allclose(img.tokens[:, 0], img.tokens[:, 1:].mean(1), atol=1e-6)
    tok = model.tokenize(CAPTIONS[:2])
    txt = model.encode_text(tok["input_ids"], tok["attention_mask"])
    assert img.embed.shape == txt.embed.shape == (2, 256)
    assert torch.allclose(txt.embed.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_full_loss_reaches_every_trainable_parameter(model):
    logs = run(model, LossConfig())
    assert set(logs) >= {"itc", "tri", "itm", "mlm", "total", "temp"}
    assert no_grad(model) == set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p.grad).all(), name
    # momentum twins are never trained
    assert all(not p.requires_grad for n, p in model.named_parameters() if "_m." in n)


def test_weight_zero_removes_the_term_and_its_parameters(model):
    fusion_only = {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("fusion_encoder.", "image_to_text.", "itm_head.", "mlm_head."))
    }
    logs = run(model, LossConfig(w_itm=0.0, w_mlm=0.0))
    assert "itm" not in logs and "mlm" not in logs
    assert no_grad(model) == fusion_only
    run(model, LossConfig(w_mlm=0.0))
    assert no_grad(model) == {n for n in fusion_only if n.startswith("mlm_head.")}
    run(model, LossConfig(w_itm=0.0))
    assert no_grad(model) == {"itm_head.weight", "itm_head.bias"}
    # without ITC, τ is only used to sample ITM negatives (no gradient) and the queue is idle
    ptr = model.queue.ptr.clone()
    run(model, LossConfig(w_itc=0.0))
    assert no_grad(model) == {"temp"} and torch.equal(model.queue.ptr, ptr)


def test_momentum_update_and_queue(model):
    m = model.cfg.momentum
    online = model.vision_proj.weight.detach().clone()
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)  # make online and momentum differ
    before = model.vision_proj_m.weight.detach().clone()
    run(model, LossConfig())
    expected = m * before + (1 - m) * (online + 1.0)
    assert torch.allclose(model.vision_proj_m.weight, expected, atol=1e-6)
    _, _, ids = model.queue.contents()
    assert sorted(ids.tolist()) == sorted(IDS.tolist())
    run(model, LossConfig())  # second batch: ITC sees the first batch in the queue
    assert model.queue.contents()[2].numel() == 12


def test_itc_alpha_needs_momentum(base_model):
    cfg = dataclasses.replace(base_model.cfg, queue_size=0)
    plain = build_model(cfg, use_momentum=False)
    assert not hasattr(plain, "visual_m")
    run(plain, LossConfig(itc_alpha=0.0))
    with pytest.raises(ValueError, match="itc_alpha > 0 needs the momentum"):
        run(plain, LossConfig(itc_alpha=0.4))


def test_feature_queue_ring_buffer():
    q = FeatureQueue(size=5, dim=2)
    assert q.contents()[0].shape == (0, 2)
    for start in (0, 3, 6):
        ids = torch.arange(start, start + 3)
        q.enqueue(ids.float().view(-1, 1).repeat(1, 2), -ids.float().view(-1, 1).repeat(1, 2), ids)
    img, txt, ids = q.contents()
    assert sorted(ids.tolist()) == [4, 5, 6, 7, 8]  # the oldest four left
    assert torch.equal(img[:, 0], ids.float()) and torch.equal(txt[:, 1], -ids.float())
    q.enqueue(torch.zeros(7, 2), torch.zeros(7, 2), torch.arange(100, 107))  # more than fits
    assert sorted(q.contents()[2].tolist()) == [102, 103, 104, 105, 106]


def test_training_steps_reduce_the_loss(model):
    """A few SGD steps on one fixed batch lower the ITC + triplet loss (the model learns)."""
    cfg = LossConfig(w_itm=0.0, w_mlm=0.0, itc_alpha=0.0)
    model.queue.size = 0  # in-batch only, so the loss is comparable step to step
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss, _ = compute_losses(model, images(), CAPTIONS, IDS, cfg)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
