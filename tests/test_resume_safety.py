"""Resume that cannot be fooled: a real kill inside the checkpoint-save window, and every file type damaged."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modaltune.shared import checkpoint as ckpt
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.training import STATE_FILE, StagePlan, TrainConfig, run_stages
from modaltune.text.data import PadCollator

CFG = TrainConfig(max_steps=6, batch_size=4, lr=1e-2, scheduler="constant", warmup_ratio=0.0, save_steps=2,
                  logging_steps=4, precision="fp32", seed=3, save_total_limit=2)

# Trains the tiny model as _train does, and SIGKILLs itself right after the Trainer method ``where`` ran while
# saving step ``at``: the window between the modaltune weights and the Trainer's own state files.
KILLER = textwrap.dedent(
    """
    import dataclasses, os, signal, sys
    import torch
    from transformers import Trainer
    from modaltune.shared.peft import ComponentConfig
    from modaltune.shared.training import StagePlan, TrainConfig, run_stages
    from modaltune.text.data import InstructionDataConfig, PadCollator, PromptFormatter, TokenizedDataset, load_splits
    from modaltune.shared.lm import ModelConfig, build_text_model

    model_dir, data, run_dir, at, where, cfg_json = sys.argv[1:]
    original = getattr(Trainer, where)

    def then_die(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.state.global_step == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(Trainer, where, then_die)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok, _ = build_text_model(ModelConfig(name=model_dir), ComponentConfig(method="lora", r=4, dropout=0.0),
                                     compute_dtype=torch.float32)
    splits = load_splits(InstructionDataConfig(source=data, split=[1.0, 0.0, 0.0]))
    ds = TokenizedDataset(splits.examples["train"], PromptFormatter(tok), 256, splits.skipped["train"])
    cfg = TrainConfig(**__import__("json").loads(cfg_json))
    run_stages(model, [StagePlan("sft", ds)], cfg, run_dir=run_dir, collator=PadCollator(tok.pad_token_id),
               component_lrs={}, checkpoint_meta={"recipe": "test"})
    """
)


def _setup(folder, data, lora_sft):
    torch.set_num_threads(1)  # as the killed subprocess trains, so the weights compare bit for bit
    return lora_sft(folder, data)


def _train(model, tok, ds, run_dir, cfg, **kw):
    return run_stages(model, [StagePlan("sft", ds)], cfg, run_dir=run_dir, collator=PadCollator(tok.pad_token_id),
                      component_lrs={}, checkpoint_meta={"recipe": "test"}, **kw)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_llama, sft_data, lora_sft):
    """An uninterrupted run: its final trained weights, stage summary and run folder."""
    threads = torch.get_num_threads()
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    model, tok, ds = _setup(tiny_llama, sft_data, lora_sft)
    result = _train(model, tok, ds, run_dir, CFG)
    torch.set_num_threads(threads)
    return model.trained_state_dict(), result.stages[0], run_dir


@pytest.mark.parametrize("where", ["_save_optimizer_and_scheduler", "_save_rng_state"])
def test_a_kill_inside_the_save_window_resumes_from_the_checkpoint_before(tmp_path, tiny_llama, sft_data,
                                                                          straight, where, lora_sft):
    run_dir = tmp_path / "run"
    cfg_json = json.dumps(dataclasses.asdict(CFG))
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tiny_llama), str(sft_data), str(run_dir), "4", where,
                           cfg_json], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # it really died by SIGKILL inside the window
    stage_dir = run_dir / "stages" / "sft"
    assert (stage_dir / "checkpoint-4" / ckpt.WEIGHTS).is_file()  # the weights were written ...
    assert not (stage_dir / "checkpoint-4" / "trainer_state.json").exists()  # ... the Trainer's state was not
    assert ckpt.problem(stage_dir / "checkpoint-4") is not None
    assert ckpt.problem(stage_dir / "checkpoint-2") is None

    lines: list[str] = []
    model, tok, ds = _setup(tiny_llama, sft_data, lora_sft)
    resumed = _train(model, tok, ds, run_dir, dataclasses.replace(CFG, resume=True), log=lines.append)
    assert resumed.stages[0]["resumed_from"].endswith("checkpoint-2")
    assert len(lines) == 2 and "checkpoint-4" in lines[0] and "marker" in lines[0]
    assert "continues from" in lines[1] and lines[1].split(" (step")[0].endswith("checkpoint-2")  # says where it went on
    want, summary, _ = straight
    got = model.trained_state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name  # bit-identical to the uninterrupted run
    # train_loss covers all six steps, not only the four trained after the resume
    assert resumed.stages[0]["train_loss"] == pytest.approx(summary["train_loss"], rel=1e-6)
    assert sorted(p.name for p in stage_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


DAMAGE = ["trained.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
          "modaltune.json", STATE_FILE, "adapter/llm/adapter_model.safetensors"]


@pytest.mark.parametrize("name", DAMAGE)
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_newest_checkpoint_is_skipped_with_one_line_naming_it(tmp_path, straight, name, how):
    import shutil

    _, _, source = straight
    stage_dir = tmp_path / "sft"
    shutil.copytree(source / "stages" / "sft", stage_dir)
    target = stage_dir / "checkpoint-6" / name
    data = bytearray(target.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    lines: list[str] = []
    assert ckpt.latest_checkpoint(stage_dir, log=lines.append).name == "checkpoint-4"
    assert len(lines) == 1 and "checkpoint-6" in lines[0] and name in lines[0]
    # the size check alone (no hashing) catches truncation
    assert ckpt.is_complete(stage_dir / "checkpoint-6") == (how == "flip")
    with pytest.raises(ModaltuneError, match=name.replace(".", r"\.")):
        ckpt.read_meta(stage_dir / "checkpoint-6")


@pytest.mark.parametrize("damaged", [ckpt.WEIGHTS, f"adapter/llm/{ckpt.ADAPTER_FILE}"])
def test_a_damaged_weights_file_behind_an_old_marker_fails_with_the_checkpoint_named(tmp_path, straight, damaged):
    import shutil

    want, _, source = straight
    folder = tmp_path / "old"
    shutil.copytree(source / "checkpoint", folder)
    (folder / ckpt.MARKER).write_text(ckpt.LEGACY_MARKER)  # a checkpoint written before markers listed files
    assert ckpt.problem(folder) is None
    weights = folder / damaged
    weights.write_bytes(weights.read_bytes()[:6])

    class Holder(torch.nn.Module):
        def trained_state_dict(self):
            return want

    with pytest.raises(ModaltuneError, match=rf"old.*{re.escape(damaged)} cannot be read.*earlier checkpoint"):
        ckpt.load_trained(Holder(), folder)


def test_rotation_keeps_complete_checkpoints_and_the_newest_is_never_deleted_first(tmp_path):
    for step in (2, 4, 6, 8):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / ckpt.WEIGHTS).write_bytes(b"w")
        (folder / ckpt.META).write_text("{}")
        if step != 8:
            ckpt.write_marker(folder)
    ckpt.rotate(tmp_path, 2)  # checkpoint-8 is still being written: it and the two newest complete ones stay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert isinstance(json.loads((tmp_path / "checkpoint-6" / ckpt.MARKER).read_text())["files"], dict)
    assert Path(tmp_path / "checkpoint-6" / ckpt.MARKER).is_file()
