"""CUDA checks (skipped without a GPU): QLoRA and bf16 training steps on the device; audio-llm's word tokens."""

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


@pytest.mark.gpu
def test_word_tokens_ground_collapse_and_read_on_cuda(tiny_whisper, tiny_gemma):
    """audio-llm's word tokens on the GPU: a grounding-only step (the CTC loss), a collapsed prompt's loss, and the
    greedy reading of encoder states cached on the CPU."""
    from modaltune.shared.compose import read_words
    from modaltune.shared.compose_data import ComposedCollator, stage_collator, to_device
    from tests.test_audio_llm import _composed, _two_clips

    model, tok, _ = _composed(tiny_whisper, tiny_gemma, norm="both", word_grounding=1.0, anchor_words=16,
                              grounding="ctc", collapse=True)
    waves, cache, ds = _two_clips(model, tok)
    model.cuda().train()
    plain = ComposedCollator(tok.pad_token_id)
    for collate in (stage_collator("grounding", plain), plain):
        model.zero_grad()
        batch = to_device(collate([ds[0], ds[1]]), torch.device("cuda"))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch)["loss"]
        loss.backward()
        assert torch.isfinite(loss) and loss.item() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    read = read_words(model, [cache.get(k) for k in waves])  # states on the CPU, the model on the GPU
    assert len(read) == 2 and all(isinstance(t, int) for r in read for t in r)
