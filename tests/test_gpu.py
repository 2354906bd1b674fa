"""CUDA checks (skipped without a GPU): QLoRA and bf16 training steps on the device."""

from __future__ import annotations

import pytest
import torch

from modaltune.shared.peft import ComponentConfig
from modaltune.shared.lm import ModelConfig, build_text_model


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["qlora", "lora8bit", "dora"])
def test_quantised_and_dora_steps_on_cuda(method, tiny_llama):
    model, tok, _ = build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method=method, r=4),
                                     compute_dtype=torch.bfloat16)
    model.cuda().train()
    ids = torch.randint(4, len(tok), (2, 12), device="cuda")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)["loss"]
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
