"""LoRA-FA (`method: lora_fa`): A stays at its initialisation, B trains with peft's LoRA-FA optimizer."""

from __future__ import annotations

import json

import pytest
import torch

from modaltune.shared import checkpoint as ckpt
from modaltune.shared.cli import main
from modaltune.shared.errors import ConfigError
from modaltune.shared.lm import ModelConfig, build_text_model
from modaltune.shared.peft import ComponentConfig
from modaltune.shared.training import ModaltuneTrainer, lora_scale


def _run(tmp_path, model, data, method, *extra):
    out = tmp_path / method
    code = main(["run", "text-sft", "--out", str(out), f"model.name={model}", f"data.source={data}",
                 f"llm.method={method}", "train.max_steps=3", "train.batch_size=4", "train.save_steps=3",
                 "eval.max_examples=2", "eval.max_new_tokens=2", "train.precision=fp32", "train.lr=1e-2", *extra])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_lora_fa_trains_b_only_with_the_lora_fa_optimizer(tmp_path, tiny_llama, sft_data):
    from peft.optimizers.lorafa import LoraFAOptimizer

    model, _, _ = build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="lora_fa", r=4, alpha=8),
                                   compute_dtype=torch.float32)
    a_names = {n for n in model.trained_names if ".lora_A." in n}
    assert a_names and a_names == model.fixed_factors  # saved with the adapter ...
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in a_names)  # ... never trained
    lora = build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="lora", r=4, alpha=8),
                            compute_dtype=torch.float32)[0]
    a_count = sum(p.numel() for n, p in model.named_parameters() if n in a_names)
    assert model.parameter_report()["total"]["trainable"] == lora.parameter_report()["total"]["trainable"] - a_count
    trainer = ModaltuneTrainer.__new__(ModaltuneTrainer)  # only its optimizer is wanted here
    trainer.optimizer, trainer.model, trainer.component_lrs = None, model, {}
    from transformers import TrainingArguments

    trainer.args = TrainingArguments(output_dir=str(tmp_path / "x"), learning_rate=1e-3, use_cpu=True)
    opt = trainer.create_optimizer()
    assert isinstance(opt, LoraFAOptimizer)
    names = opt.param_groups[0]["names"]
    b = next(n for n in names if ".lora_B." in n)
    assert names[names.index(b) - 1] == b.replace(".lora_B.", ".lora_A.")  # each fixed A just before its B
    assert opt.param_groups[0]["scaling_factors"][names.index(b)] == lora_scale(model, b) == 2.0

    out, report = _run(tmp_path, tiny_llama, sft_data, "lora_fa")
    _, lora_report = _run(tmp_path, tiny_llama, sft_data, "lora")
    trained = ckpt.read_trained(out / "checkpoint")
    from modaltune.shared.run import seed_everything

    seed_everything(42)  # as the run did before building its model: the same initial A
    fresh, _, _ = build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="lora_fa", r=16, alpha=32),
                                   compute_dtype=torch.float32)
    start = dict(fresh.named_parameters())
    a_keys = [k for k in trained if ".lora_A." in k]
    b_keys = [k for k in trained if ".lora_B." in k]
    assert a_keys and all(torch.equal(trained[k], start[k].detach()) for k in a_keys)  # A: its seeded init
    assert all(trained[k].abs().max() > 0 for k in b_keys)  # B moved off zero
    fa_state = report["training"]["stages"][0]["optimizer_state_mb"]
    lora_state = lora_report["training"]["stages"][0]["optimizer_state_mb"]
    a_size, b_size = (sum(trained[k].numel() for k in keys) for keys in (a_keys, b_keys))
    assert fa_state == pytest.approx(2 * 4 * b_size / 2 ** 20, rel=1e-2)  # Adam's two moments of B only
    assert lora_state == pytest.approx(2 * 4 * (a_size + b_size) / 2 ** 20, rel=1e-2)
    assert report["metrics"]["after"]["test/loss"] < report["metrics"]["before"]["test/loss"]
    # the checkpoint reloads to the same outputs, and merges
    assert main(["eval", "text-sft", "--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / "ev"),
                 "eval.max_examples=2", "eval.max_new_tokens=2"]) == 0
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert ev["metrics"]["after"]["test/loss"] == pytest.approx(report["metrics"]["after"]["test/loss"], rel=1e-5)
    assert main(["merge", "--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / "merged")]) == 0


def test_lora_fa_resumes_and_refuses_mixing(tmp_path, tiny_llama, sft_data):
    out, straight = _run(tmp_path, tiny_llama, sft_data, "lora_fa", "train.save_steps=1", "train.max_steps=3")
    # cut the run back to its step-2 checkpoint and resume: the same weights as the straight run
    stage = out / "stages" / "sft"
    for extra in ["final"]:
        import shutil

        shutil.rmtree(stage / extra)
    shutil.rmtree(stage / "checkpoint-3")
    assert main(["run", "text-sft", "--out", str(out), f"model.name={tiny_llama}", f"data.source={sft_data}",
                 "llm.method=lora_fa", "train.max_steps=3", "train.batch_size=4", "train.save_steps=1",
                 "eval.max_examples=2", "eval.max_new_tokens=2", "train.precision=fp32", "train.lr=1e-2",
                 "train.resume=true"]) == 0
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["metrics"]["after"]["test/loss"] == pytest.approx(straight["metrics"]["after"]["test/loss"],
                                                                     rel=1e-5)
    from modaltune.shared.peft import ComponentSpec, apply_peft
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    with pytest.raises(ConfigError, match="one adapter type"):
        apply_peft(lm, [ComponentSpec("a", "model.layers.0", ComponentConfig(method="lora_fa", targets=["q_proj"])),
                        ComponentSpec("b", "model.layers.1", ComponentConfig(method="lora", targets=["q_proj"]))])


def test_recording_the_trained_weights_again_keeps_fixed_factors_and_one_rank_controller(tiny_llama):
    fa, _, _ = build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="lora_fa", r=4, alpha=8),
                                compute_dtype=torch.float32)
    fixed, trained = set(fa.fixed_factors), fa.trained_names
    fa.record_trained()  # as a recipe that adds a stage does
    assert fa.fixed_factors == fixed and fa.trained_names == trained  # A is still saved, still fixed
    dy, _, _ = build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="dylora", r=4, alpha=8),
                                compute_dtype=torch.float32)
    layer = dy.peft_state("dylora").layers[0]
    dy.record_trained()
    assert len(layer.lora_A["default"]._forward_hooks) == 1  # the first controller's hooks came off
