"""Label-position-only logits give the same loss and gradients as full logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from modaltune.shared.loss import causal_lm_loss, check_label_logits, full_logits_cross_entropy, label_logits_cross_entropy


def _batch(vocab: int, pad_right: bool = True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :6] = -100
    mask[1, 10:] = 0  # a padded row
    labels[1, 10:] = -100
    return ids, mask, labels


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_label_only_loss_and_grads_match_full_logits(fixture, request):
    folder = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(str(folder)).train()
    torch.manual_seed(0)
    ids, mask, labels = _batch(model.config.vocab_size)

    fast = causal_lm_loss(model, labels=labels, input_ids=ids, attention_mask=mask)
    fast.backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # transformers' own loss
    full.backward()
    assert fast.item() == pytest.approx(full.item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(g_fast[n], p.grad, atol=1e-6), n


def test_softcapped_head_matches():
    cfg = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids, mask, labels = _batch(300)
    fast = causal_lm_loss(model, labels=labels, input_ids=ids, attention_mask=mask)
    full = full_logits_cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
    assert fast.item() == pytest.approx(full.item(), rel=1e-5)
    assert check_label_logits(model, 300) < 1e-5


def test_num_items_in_batch_normalises_the_sum():
    hidden = torch.randn(2, 5, 8)
    head = torch.nn.Linear(8, 11)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [-100, -100, 4, 5, -100]])
    mean = label_logits_cross_entropy(hidden, labels, head)
    summed = label_logits_cross_entropy(hidden, labels, head, num_items_in_batch=1)
    assert summed.item() == pytest.approx(mean.item() * 5, rel=1e-6)
    none = label_logits_cross_entropy(hidden, torch.full((2, 5), -100), head)
    assert none.item() == 0.0
