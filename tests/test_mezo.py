"""MeZO (`train.optimizer: mezo`): two forward passes a step, a replayed seeded perturbation, trainable weights only."""

from __future__ import annotations

import json

import pytest
import torch

from modaltune.shared import checkpoint as ckpt
from modaltune.shared.cli import main
from modaltune.shared.mezo import _normal


def _run(tmp_path, model, data, name, *extra):
    out = tmp_path / name
    assert main(["run", "text-sft", "--out", str(out), f"model.name={model}", f"data.source={data}",
                 "train.optimizer=mezo", "train.max_steps=20", "train.batch_size=8", "train.save_steps=10",
                 "train.lr=5e-2", "train.mezo_eps=1e-2", "train.warmup_ratio=0", "eval.max_examples=2",
                 "eval.max_new_tokens=2", "train.precision=fp32", *extra]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_perturbation_is_replayed_exactly():
    p = torch.nn.Parameter(torch.zeros(5, 3))
    assert torch.equal(_normal(p, 123, 4), _normal(p, 123, 4))
    assert not torch.equal(_normal(p, 123, 4), _normal(p, 123, 5))
    assert not torch.equal(_normal(p, 123, 4), _normal(p, 124, 4))


def test_mezo_lowers_the_loss_without_gradients_or_optimizer_state(tmp_path, tiny_llama, sft_data):
    out, report = _run(tmp_path, tiny_llama, sft_data, "mezo")
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert after["validation/loss"] < before["validation/loss"] - 0.005
    stage = report["training"]["stages"][0]
    assert stage["optimizer_state_mb"] == 0.0  # no moments, no gradients were ever made
    # only the adapter moved: the checkpoint holds LoRA weights and loads back to the same loss
    trained = ckpt.read_trained(out / "checkpoint")
    assert trained and all("lora_" in k for k in trained)
    assert main(["eval", "text-sft", "--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / "ev"),
                 "eval.max_examples=2", "eval.max_new_tokens=2"]) == 0
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert ev["metrics"]["after"]["test/loss"] == pytest.approx(after["test/loss"], rel=1e-5)
    assert main(["merge", "--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / "merged")]) == 0
    # the same seed gives the same run; a resumed run replays the same directions
    _, again = _run(tmp_path, tiny_llama, sft_data, "mezo-again")
    assert again["metrics"]["after"]["test/loss"] == after["test/loss"]
    import shutil

    shutil.rmtree(out / "stages" / "sft" / "final")
    shutil.rmtree(out / "stages" / "sft" / "checkpoint-20")
    _, resumed = _run(tmp_path, tiny_llama, sft_data, "mezo", "train.resume=true")
    assert resumed["metrics"]["after"]["test/loss"] == pytest.approx(after["test/loss"], rel=1e-5)


def test_mezo_refusals(tmp_path, tiny_llama, sft_data, capsys):
    code = main(["run", "text-sft", "--out", str(tmp_path / "x"), f"model.name={tiny_llama}",
                 f"data.source={sft_data}", "train.optimizer=mezo", "train.grad_accum=2"])
    assert code == 2 and "batch_size" in capsys.readouterr().err
    code = main(["run", "text-sft", "--out", str(tmp_path / "y"), f"model.name={tiny_llama}",
                 f"data.source={sft_data}", "train.optimizer=mezo", "llm.method=dylora", "train.max_steps=2",
                 "train.precision=fp32"])
    assert code == 2 and "dylora" in capsys.readouterr().err


def test_mezo_restores_the_weights_exactly_and_drives_lora_fa(tmp_path, tiny_llama, sft_data):
    from modaltune.shared.lm import ModelConfig, build_text_model
    from modaltune.shared.peft import ComponentConfig
    from modaltune.shared.run import seed_everything

    seed_everything(42)  # as the run does before building its model: the same initial adapter
    start = {n: p.detach().clone() for n, p in build_text_model(
        ModelConfig(name=str(tiny_llama)), ComponentConfig(method="lora", r=16, alpha=32),
        compute_dtype=torch.float32)[0].named_parameters() if "lora_" in n}
    # at learning rate 0 every step perturbs and measures, and must leave each weight bit for bit where it was
    out, _ = _run(tmp_path, tiny_llama, sft_data, "still", "train.lr=0", "train.max_steps=5")
    trained = ckpt.read_trained(out / "checkpoint")
    assert trained.keys() == start.keys() and all(torch.equal(trained[k], start[k]) for k in start)
    # LoRA-FA under MeZO: A is never perturbed, B moves
    out, report = _run(tmp_path, tiny_llama, sft_data, "fa", "llm.method=lora_fa", "train.max_steps=5")
    trained = ckpt.read_trained(out / "checkpoint")
    a_keys = [k for k in trained if ".lora_A." in k]
    assert a_keys and all(torch.equal(trained[k], start[k]) for k in a_keys)
    assert all(trained[k].abs().max() > 0 for k in trained if ".lora_B." in k)
    assert report["training"]["stages"][0]["optimizer_state_mb"] == 0.0
