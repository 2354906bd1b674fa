"""Training core: resume continues the same run, stages carry weights, component LRs, atomic checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from modaltune.shared import checkpoint as ckpt
from modaltune.shared.training import StagePlan, TrainConfig, run_stages
from modaltune.text.data import PadCollator


CFG = TrainConfig(max_steps=6, batch_size=4, lr=1e-2, scheduler="constant", warmup_ratio=0.0, save_steps=2,
                  logging_steps=1, precision="fp32", seed=3)


def _train(model, tok, ds, run_dir, cfg, **kw):
    return run_stages(model, [StagePlan("sft", ds)], cfg, run_dir=run_dir, collator=PadCollator(tok.pad_token_id),
                      component_lrs={}, checkpoint_meta={"recipe": "test"}, **kw)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, tiny_llama, sft_data, lora_sft, crash):
    model, tok, ds = lora_sft(tiny_llama, sft_data)
    straight = _train(model, tok, ds, tmp_path / "a", CFG)
    assert straight.stages[0]["steps"] == 6
    want = model.trained_state_dict()

    model, tok, ds = lora_sft(tiny_llama, sft_data)
    with pytest.raises(KeyboardInterrupt):
        _train(model, tok, ds, tmp_path / "b", CFG, callbacks=[crash(5)])
    stage_dir = tmp_path / "b" / "stages" / "sft"
    assert ckpt.latest_checkpoint(stage_dir).name == "checkpoint-4"
    logged = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert 5 in logged  # step 5 was logged before the crash, and will be trained again
    # a checkpoint whose write was cut short is never resumed from
    (stage_dir / "checkpoint-5").mkdir()
    (stage_dir / "checkpoint-5" / ckpt.WEIGHTS).write_bytes(b"partial")
    assert ckpt.latest_checkpoint(stage_dir).name == "checkpoint-4"

    model, tok, ds = lora_sft(tiny_llama, sft_data)
    resumed = _train(model, tok, ds, tmp_path / "b", dataclasses.replace(CFG, resume=True))
    assert resumed.stages[0]["resumed_from"].endswith("checkpoint-4")
    assert resumed.stages[0]["steps"] == 6
    got = model.trained_state_dict()
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6), name
    logged_steps = [r["step"] for r in resumed.rows if "loss" in r]
    assert logged_steps == sorted(set(logged_steps)) and logged_steps[-1] == 6


def _optimizer_state(path) -> dict[int, dict[str, torch.Tensor]]:
    return torch.load(path / "optimizer.pt", weights_only=True)["state"]


def test_resume_restores_optimizer_state(tmp_path, tiny_llama, sft_data, lora_sft, crash):
    """A run cut after step 3 resumes from checkpoint-2 with AdamW's moments and step counts as they were: at
    checkpoint-4 its optimizer state and weights are those of a run that never stopped (a fresh optimizer there
    would restart the moments and the bias correction, and step 3 would differ)."""
    cfg = dataclasses.replace(CFG, max_steps=4)
    model, tok, ds = lora_sft(tiny_llama, sft_data)
    _train(model, tok, ds, tmp_path / "a", cfg)
    straight = tmp_path / "a" / "stages" / "sft" / "checkpoint-4"

    model, tok, ds = lora_sft(tiny_llama, sft_data)
    with pytest.raises(KeyboardInterrupt):
        _train(model, tok, ds, tmp_path / "r", cfg, callbacks=[crash(3)])
    stage_dir = tmp_path / "r" / "stages" / "sft"
    saved = _optimizer_state(stage_dir / "checkpoint-2")
    assert saved and {int(s["step"]) for s in saved.values()} == {2}
    model, tok, ds = lora_sft(tiny_llama, sft_data)
    resumed = _train(model, tok, ds, tmp_path / "r", dataclasses.replace(cfg, resume=True))
    assert resumed.stages[0]["resumed_from"].endswith("checkpoint-2")

    want, got = _optimizer_state(straight), _optimizer_state(stage_dir / "checkpoint-4")
    assert set(got) == set(want) and {int(s["step"]) for s in got.values()} == {4}
    for index, state in want.items():
        assert set(got[index]) == set(state) >= {"exp_avg", "exp_avg_sq"}
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(got[index][key], state[key], rtol=1e-5, atol=1e-9), (index, key)
    want_w, got_w = ckpt.read_trained(straight), ckpt.read_trained(stage_dir / "checkpoint-4")
    assert set(got_w) == set(want_w) and want_w
    for name, tensor in want_w.items():
        assert torch.allclose(got_w[name], tensor, atol=1e-6), name


def test_stages_train_only_their_components_and_keep_all_trained_weights(tmp_path, tiny_llama, sft_data, lora_sft):
    model, tok, ds = lora_sft(tiny_llama, sft_data)
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = dataclasses.replace(CFG, max_steps=2)
    with pytest.raises(Exception, match="nothing to train"):
        run_stages(model, [StagePlan("frozen", ds, components=[], max_steps=1)], cfg, run_dir=tmp_path / "f",
                   collator=PadCollator(tok.pad_token_id), component_lrs={}, checkpoint_meta={"recipe": "t"})
    result = run_stages(
        model, [StagePlan("one", ds, max_steps=2), StagePlan("two", ds, components=["llm"], max_steps=1)], cfg,
        run_dir=tmp_path / "s", collator=PadCollator(tok.pad_token_id), component_lrs={},
        checkpoint_meta={"recipe": "test"},
    )
    assert [s["stage"] for s in result.stages] == ["one", "two"]
    assert ckpt.is_complete(tmp_path / "s" / "stages" / "one" / "final")
    fresh, _, _ = lora_sft(tiny_llama, sft_data)
    ckpt.load_trained(fresh, result.checkpoint)  # the final checkpoint holds every trained tensor
    for name, tensor in model.trained_state_dict().items():
        assert torch.equal(dict(fresh.named_parameters())[name].detach(), tensor)
    changed = [n for n, p in model.named_parameters() if not torch.equal(first[n], p.detach())]
    assert changed and set(changed) <= model.trained_names


def test_component_learning_rates_make_their_own_groups(tmp_path, tiny_llama, sft_data, lora_sft):
    from transformers import TrainingArguments

    from modaltune.shared.training import ModaltuneTrainer

    model, tok, ds = lora_sft(tiny_llama, sft_data)
    trainer = ModaltuneTrainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1,
                                            use_cpu=True, report_to=[]),
        train_dataset=ds, data_collator=PadCollator(tok.pad_token_id), component_lrs={"llm": 5e-5},
    )
    opt = trainer.create_optimizer()
    assert {g["lr"] for g in opt.param_groups} == {5e-5}
    assert {g["component"] for g in opt.param_groups} == {"llm"}
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, tiny_gemma, sft_data, lora_sft):
    model, tok, ds = lora_sft(tiny_gemma, sft_data, method="dora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ckpt.save_checkpoint(model, tmp_path / "c", meta={"recipe": "t"})
    assert ckpt.is_complete(tmp_path / "c") and (tmp_path / "c" / "adapter" / "llm" / "adapter_config.json").exists()
    fresh, _, _ = lora_sft(tiny_gemma, sft_data, method="dora")
    ids = torch.tensor([ds[0]["input_ids"]])
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
        ckpt.load_trained(fresh, tmp_path / "c")
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    other, _, _ = lora_sft(tiny_gemma, sft_data, method="lora")
    with pytest.raises(Exception, match="does not fit"):
        ckpt.load_trained(other, tmp_path / "c")


@pytest.mark.parametrize("kernel,expected", [("brg_matmul:avx10_1_512_amx", "bf16"), ("brg_matmul:avx512_core_bf16", "bf16"),
                                             ("brg_matmul:avx2", "fp32"), ("gemm:jit", "fp32"), ("none", "fp32"),
                                             (None, "bf16")])
def test_auto_precision_reads_the_onednn_kernel_name(monkeypatch, kernel, expected):
    """The rule on a oneDNN kernel name alone (the detection itself is tested below, unpatched)."""
    from modaltune.shared import training

    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(training, "bf16_matmul_kernel", lambda: kernel)
    assert training.resolve_precision("auto") == expected


def _isa_capped() -> bool:
    return any(os.environ.get(v) for v in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"))


def test_auto_precision_detects_this_cpu_as_torch_reports_it(monkeypatch):
    """Unpatched detection against torch's own report of the CPU (its cpuinfo library, not /proc/cpuinfo):
    bf16 exactly where torch sees bf16 instructions (AVX512-BF16 or AMX) and oneDNN is not capped below them."""
    from modaltune.shared import environment
    from modaltune.shared.training import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if os.path.exists("/proc/cpuinfo"):  # the flags modaltune reads agree with what torch found
        flags = environment.cpu_flags()
        assert ("avx512_bf16" in flags) == torch.cpu._is_avx512_bf16_supported(), sorted(flags)
        assert ("avx512f" in flags) == torch.cpu._is_avx512_supported(), sorted(flags)
    if hardware and _isa_capped():
        pytest.skip("oneDNN's ISA is capped in this environment; the capped case is tested in a subprocess below")
    assert resolve_precision("auto") == ("bf16" if hardware else "fp32")


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: a test CPU
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl{extra}

processor\t: 1
"""


@pytest.mark.parametrize("extra,bf16", [(" avx512_bf16", True), (" amx_tile amx_bf16", True), ("", False)])
def test_auto_precision_follows_the_cpuinfo_flags(monkeypatch, extra, bf16):
    """Only the lowest probe is replaced (the text of ``/proc/cpuinfo``); the oneDNN kernel probe runs for real.
    Flags without bf16 give fp32; bf16 flags give bf16 wherever oneDNN reports bf16 support on this CPU."""
    import io

    from modaltune.shared import environment
    from modaltune.shared.training import resolve_precision

    real_open = open

    def fake_open(path, *args, **kwargs):
        return io.StringIO(CPUINFO.format(extra=extra)) if str(path) == "/proc/cpuinfo" else real_open(path, *args, **kwargs)

    monkeypatch.setattr(environment, "open", fake_open, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # torch's own hint stays neutral
    assert "avx512f" in environment.cpu_flags() and ("avx512_bf16" in extra) == ("avx512_bf16" in environment.cpu_flags())
    onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and not _isa_capped()
    assert resolve_precision("auto") == ("bf16" if bf16 and onednn_bf16 else "fp32")


def test_auto_precision_follows_a_capped_onednn_isa():
    import subprocess
    import sys

    from modaltune.shared.environment import cpu_flags

    if not {"avx512_bf16", "amx_bf16"} & cpu_flags():
        pytest.skip("this CPU has no bf16 instructions")
    code = "from modaltune.shared.training import resolve_precision; print(resolve_precision('auto'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, check=True)
    assert out.stdout.strip() == "fp32"  # bf16 would be emulated there: many times slower than fp32
