"""The SSN head and loss against the official math (docs/ssn.md), masks, gradients, parameter groups.

The official forward and loss are the step-by-step re-statement in ``benchmarks/official_head.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.official_head import official_compose as official_forward
from benchmarks.official_head import official_ssn_loss as official_loss
from benchmarks.official_head import official_target
from model import SSNHead, masked_mean, ssn_loss, ssn_loss_terms

B, P, L, D_IMG, W = 4, 9, 7, 48, 32


def _inputs(seed: int = 0, batch: int = B, text_len: int = L):
    g = torch.Generator().manual_seed(seed)
    return dict(
        ref_tokens=torch.randn(batch, 1 + P, D_IMG, generator=g),
        ref_embed=torch.randn(batch, W, generator=g),
        text_tokens=torch.randn(batch, text_len, W, generator=g),
        text_embed=torch.randn(batch, W, generator=g),
        text_mask=torch.ones(batch, text_len),
    )


def _head(seed: int = 0) -> SSNHead:
    torch.manual_seed(seed)
    return SSNHead(D_IMG, W, W, nhead=8, dim_feedforward=64).eval()


def test_compose_and_target_equal_official_math():
    head, x = _head(), _inputs()
    with torch.no_grad():
        q_pos, q_neg = head.compose(**x)
        ref_pos, ref_neg = official_forward(head, **x)
        target = head.encode_target(x["ref_tokens"], x["ref_embed"])
        ref_target = official_target(head, x["ref_tokens"], x["ref_embed"])
    torch.testing.assert_close(q_pos, ref_pos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q_neg, ref_neg, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target, ref_target, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ssn_loss(q_pos, q_neg, target, kl_weight=0.7), official_loss(ref_pos, ref_neg, ref_target, 0.7),
        atol=1e-5, rtol=1e-5,
    )
    assert q_pos.shape == (B, W) and torch.allclose(q_pos.norm(dim=-1), torch.ones(B))


def test_compose_query_is_the_positive_branch():
    head, x = _head(), _inputs()
    with torch.no_grad():
        torch.testing.assert_close(head.compose_query(**x), head.compose(**x)[0])


def test_padding_does_not_change_the_result():
    head, x = _head(), _inputs()
    padded = dict(x)
    extra = 5
    padded["text_tokens"] = torch.cat([x["text_tokens"], 1e3 * torch.randn(B, extra, W)], 1)
    padded["text_mask"] = torch.cat([x["text_mask"], torch.zeros(B, extra)], 1)
    with torch.no_grad():
        for a, b in zip(head.compose(**x), head.compose(**padded)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        s_t, _ = head.selection_weights(padded["ref_tokens"], padded["text_tokens"], padded["text_mask"])
    assert s_t.shape == (B, L + extra)


def test_official_fusion_attends_to_padding_ours_does_not():
    """The bug being fixed: without a key padding mask the official forward changes with the padding."""
    head, x = _head(), _inputs()
    padded = dict(x)
    padded["text_tokens"] = torch.cat([x["text_tokens"], 10 * torch.randn(B, 3, W)], 1)
    padded["text_mask"] = torch.cat([x["text_mask"], torch.zeros(B, 3)], 1)
    with torch.no_grad():
        official_clean = official_forward(head, **x)[0]
        official_padded = official_forward(head, **padded)[0]
    assert not torch.allclose(official_clean, official_padded, atol=1e-4)


def test_sliced_fusion_equals_transformer_encoder_layer_with_padding_mask():
    head = _head()
    tokens = torch.randn(3, 12, W)
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[0, -4:] = True
    pad[2, -1:] = True
    read = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11])
    with torch.no_grad():
        full = head.fusion_layer.layers[0](tokens.transpose(0, 1), src_key_padding_mask=pad).transpose(0, 1)
        ours = head._fuse(tokens, read, pad)
    keep = ~pad[:, read]
    torch.testing.assert_close(ours[keep], full[:, read][keep], atol=1e-5, rtol=1e-5)


def test_batch_of_one():
    head, x = _head(), _inputs(batch=1)
    q_pos, q_neg = head.compose(**x)
    assert q_pos.shape == (1, W) and q_neg.shape == (1, W)


def test_official_parameter_names_and_shapes():
    head = SSNHead(768, 512, 512)
    shapes = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    assert shapes["token_type_embeddings.weight"] == (2, 512)
    assert shapes["text_token_selection_mask.0.weight"] == (1, 1024)
    assert shapes["image_token_selection_mask.0.weight"] == (1, 1024)
    assert shapes["image_token_proj_layer.weight"] == (512, 768)
    assert shapes["fusion_layer.layers.0.self_attn.in_proj_weight"] == (1536, 512)
    assert shapes["fusion_layer.layers.0.linear1.weight"] == (2048, 512)
    assert shapes["combiner_layer.weight"] == (1024, 1024)
    assert shapes["output_layer.weight"] == (512, 1024)
    assert shapes["dynamic_scalar.0.weight"] == (1024, 1024)
    assert shapes["dynamic_scalar.2.weight"] == (1, 1024)
    assert len(shapes) == 27
    SSNHead(768, 512, 512).load_state_dict(head.state_dict())  # strict load of a same-named state


def test_width_must_equal_embedding_size():
    with pytest.raises(ValueError, match="text width"):
        SSNHead(64, 64, 32)


def test_every_head_parameter_gets_a_finite_gradient():
    head, x = _head().train(), _inputs()
    x = {k: v.requires_grad_(True) if k != "text_mask" else v for k, v in x.items()}
    q_pos, q_neg = head.compose(**x)
    target = head.encode_target(torch.randn(B, 1 + P, D_IMG), torch.randn(B, W))
    ssn_loss(q_pos, q_neg, target).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_loss_gradient_stays_finite_when_the_official_form_gives_nan():
    """docs/ssn.md: with confident logits softmax(S⁺) underflows to 0 and the official form's gradient is NaN."""
    torch.manual_seed(0)
    t = F.normalize(torch.randn(8, 16), dim=-1)
    q_pos = (t + 0.01 * torch.randn(8, 16)).requires_grad_(True)
    q_neg = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_(True)
    scaled = 20  # makes the off-diagonal logits ~ -1000 apart: softmax underflows in fp32
    official = official_loss(scaled * q_pos, scaled * q_neg, t)
    official.backward()
    assert not torch.isfinite(q_pos.grad).all()
    q_pos.grad = None
    ours = ssn_loss(scaled * q_pos, scaled * q_neg, t)
    ours.backward()
    assert torch.isfinite(q_pos.grad).all() and torch.isfinite(ours)


def test_loss_terms_and_values_by_hand():
    # Orthonormal queries equal to the targets: S⁺ = 100·I, so CE = log(1 + (B-1)e^-100) ~ 0 and the
    # first KL is 0; q⁻ = q⁺ makes the second KL 0 as well.
    t = torch.eye(3)
    terms = ssn_loss_terms(t, t, t, kl_weight=1.0)
    assert terms["loss"].item() == pytest.approx(0.0, abs=1e-6)
    # q⁻ uniform (zero vector): softmax(S⁻) uniform -> KL(p‖u) = mean over 9 entries of p log(p·3).
    terms = ssn_loss_terms(t, torch.zeros(3, 3), t)
    assert terms["kl_pos_neg"].item() == pytest.approx(3 * torch.log(torch.tensor(3.0)).item() / 9, rel=1e-5)


def test_masked_mean():
    tokens = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(tokens, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_param_groups_follow_the_official_ratios():
    head = _head()
    groups = {g["name"]: g for g in head.param_groups(lr=1.0, lr_ratio=0.2)}
    assert groups["head"]["lr"] == 1.0
    assert groups["fusion_and_selection"]["lr"] == pytest.approx(0.8)
    assert groups["token_types"]["lr"] == pytest.approx(0.8)
    assert groups["token_projection"]["lr"] == pytest.approx(0.4)
    assert groups["token_types"]["params"] == [head.token_type_embeddings.weight]
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(head.parameters()))


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_official_loss_restatement_equals_nn_kldivloss():
    """The official code's loss is built from ``nn.KLDivLoss()`` (reduction 'mean'); the re-statement the
    tests and benchmarks use must give the same value."""
    torch.manual_seed(0)
    q_pos, q_neg, t = (F.normalize(torch.randn(5, 8), dim=-1) for _ in range(3))
    y = torch.arange(5)
    s_pos, s_neg, ideal = 100 * q_pos @ t.T, 100 * q_neg @ t.T, 100 * torch.eye(5)
    kl = nn.KLDivLoss()
    expected = (F.cross_entropy(s_pos, y) + F.cross_entropy(s_pos.T, y)) / 2 + 0.5 * (
        kl(torch.log_softmax(s_pos, -1), torch.softmax(ideal, -1)) - kl(torch.log_softmax(s_neg, -1), torch.softmax(s_pos, -1))
    )
    torch.testing.assert_close(official_loss(q_pos, q_neg, t, kl_weight=0.5), expected)
