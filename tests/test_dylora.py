"""DyLoRA (`method: dylora`): one adapter trained at a rank drawn per step, usable at every rank up to r."""

from __future__ import annotations

import json

import pytest
import torch

from modaltune.shared.cli import main
from modaltune.shared.peft.dylora import eval_ranks, export_rank
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.lm import ModelConfig, build_text_model
from modaltune.shared.peft import ComponentConfig

IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])


def _model(tiny_llama, r=8):
    model, _, _ = build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="dylora", r=r, alpha=16),
                                   compute_dtype=torch.float32, label_logits_only=False)
    with torch.no_grad():  # a trained-looking adapter: B off zero
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.2)
    return model.eval()


def test_rank_b_is_the_truncated_adapter_at_scale_alpha_over_b(tiny_llama):

    model = _model(tiny_llama)
    nested = model.peft_state("dylora")
    assert nested is not None and nested.max_rank == 8 and len(nested.layers) == 14  # 7 targets x 2 blocks
    layer = nested.layers[0]
    x = torch.randn(3, layer.in_features)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        for b in (1, 3, 8):
            with nested.at(b):
                got = layer(x) - layer.base_layer(x)
            want = x @ A[:b].T @ B[:, :b].T * (16 / b)
            assert torch.allclose(got, want, atol=1e-5)
        assert layer.scaling["default"] == 16 / 8  # back at full rank after the block
    # the draw is seeded by seed and step, covers 1..r, and is the same on a rerun
    draws = [nested.draw(42, s) for s in range(400)]
    assert set(draws) == set(range(1, 9)) and draws == [nested.draw(42, s) for s in range(400)]
    assert eval_ranks(16, None) == [2, 4, 8] and eval_ranks(16, [16, 2]) == [2, 16]
    with pytest.raises(ModaltuneError, match="outside"):
        eval_ranks(8, [16])


def test_gradients_reach_only_the_drawn_ranks(tiny_llama):
    model = _model(tiny_llama).train()
    with model.peft_state("dylora").at(3):
        model(input_ids=IDS, labels=IDS)["loss"].backward()
    layer = model.peft_state("dylora").layers[0]
    ga, gb = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    assert ga[:3].abs().sum() > 0 and gb[:, :3].abs().sum() > 0
    assert ga[3:].abs().sum() == 0 and gb[:, 3:].abs().sum() == 0


def test_text_sft_dylora_reports_each_rank_and_exports_it(tmp_path, tiny_llama, sft_data):
    import peft
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["run", "text-sft", "--out", str(out), f"model.name={tiny_llama}", f"data.source={sft_data}",
                 "llm.method=dylora", "llm.r=8", "llm.alpha=16", "llm.eval_ranks=[2,4,8]", "train.max_steps=4",
                 "train.batch_size=4", "train.save_steps=2", "eval.max_examples=2", "eval.max_new_tokens=2",
                 "train.precision=fp32", "train.lr=1e-2"]) == 0
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    assert {"after_r2", "after_r4", "after_r8"} <= set(metrics)
    assert metrics["after_r8"]["test/loss"] == pytest.approx(metrics["after"]["test/loss"], rel=1e-6)
    assert metrics["after_r2"]["test/loss"] != metrics["after_r8"]["test/loss"]
    drawn = report["training"]["stages"][0]["dylora_ranks_drawn"]
    assert sum(drawn.values()) == 4 and all(1 <= int(b) <= 8 for b in drawn)
    # the exported rank-2 adapter is a plain PEFT LoRA giving the rank-2 loss
    folder = out / "adapters" / "r2" / "llm"
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2
    lm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(folder)).eval()
    model = _model(tiny_llama)
    from modaltune.shared import checkpoint as ckpt

    ckpt.load_trained(model, out / "checkpoint")
    with torch.no_grad(), model.peft_state("dylora").at(2):
        want = model.llm(IDS).logits
    with torch.no_grad():
        assert (lm(IDS).logits - want).abs().max() < 1e-5
    with pytest.raises(ModaltuneError, match="outside"):
        export_rank(out / "checkpoint" / "adapter" / "llm", 9, tmp_path / "x")
    # merged at its full rank: a plain model with the full-rank outputs
    assert main(["merge", "--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert (merged(IDS).logits - model.llm(IDS).logits).abs().max() < 1e-4
    # and combined (alone, weight 1) into a plain PEFT folder: the full-rank adapter again
    assert main(["combine", "--adapter", f"{out / 'checkpoint'}:llm", "--how", "cat",
                 "--out", str(tmp_path / "combined")]) == 0
    combined = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)),
                                              str(tmp_path / "combined")).eval()
    with torch.no_grad():
        assert (combined(IDS).logits - model.llm(IDS).logits).abs().max() < 1e-5
