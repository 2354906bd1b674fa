"""Scale-out on torch.distributed, for real: 2 CPU processes (gloo) started by torchrun, as a user would.

- a 2-process DDP run of a recipe equals one process at twice the per-device batch (losses, weights, metrics);
- one run folder, one report, one log: rank 0 writes and prints, the other rank stays quiet;
- FSDP2 (``fully_shard``) below the Trainer: a sharded step of a LoRA model matches the single-process step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from modaltune.shared.checkpoint import problem as ckpt_problem
from modaltune.shared.checkpoint import read_trained

pytestmark = pytest.mark.distributed

RUN = ["-m", "modaltune.shared.cli", "run", "text-sft"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def _torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def _text_sft_args(out: Path, model: Path, data: Path, batch: int) -> list[str]:
    return [*RUN, "--out", str(out), f"model.name={model}", f"data.source={data}", "train.max_steps=4",
            f"train.batch_size={batch}", "train.logging_steps=1", "train.save_steps=2", "train.precision=fp32",
            "eval.max_new_tokens=4", "train.lr=2e-3", "llm.dropout=0.0"]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory, tiny_llama, sft_data):
    root = tmp_path_factory.mktemp("ddp")
    os.environ.setdefault("MODALTUNE_HOME", str(root / "home"))
    two = _torchrun(2, *_text_sft_args(root / "two", tiny_llama, sft_data, batch=2))
    one = _torchrun(1, *_text_sft_args(root / "one", tiny_llama, sft_data, batch=4))
    return root, two, one


def test_two_ranks_equal_one_process_at_twice_the_batch(ddp_and_single):
    root, two, one = ddp_and_single
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    r2 = json.loads((root / "two" / "report.json").read_text())
    r1 = json.loads((root / "one" / "report.json").read_text())
    assert r2["environment"]["processes"] == 2 and "processes" not in r1["environment"]
    assert r2["training"]["stages"][0]["steps"] == r1["training"]["stages"][0]["steps"] == 4
    l2, l1 = _losses(root / "two"), _losses(root / "one")
    assert len(l2) == len(l1) == 4
    assert l2 == pytest.approx(l1, abs=1e-5)
    assert l1[0] != pytest.approx(l1[-1], abs=1e-3)  # it trained, so equal losses say something
    w2 = read_trained(root / "two" / "checkpoint")
    w1 = read_trained(root / "one" / "checkpoint")
    assert w2.keys() == w1.keys() and w2
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=0)
    after2, after1 = r2["metrics"]["after"], r1["metrics"]["after"]
    assert after2["test/loss"] == pytest.approx(after1["test/loss"], abs=1e-5)
    assert after2["validation/loss"] == pytest.approx(after1["validation/loss"], abs=1e-5)
    assert after2["test/loss"] != pytest.approx(r2["metrics"]["before"]["test/loss"], abs=1e-4)


def test_one_report_and_one_log_from_rank_zero(ddp_and_single):
    root, two, _ = ddp_and_single
    out = two.stdout
    assert out.count("[modaltune] report:") == 1, out[-3000:]
    assert out.count("[modaltune] before:") == 1 and out.count("[modaltune] after:") == 1
    assert out.count("text-sft: ok") == 1  # the summary, printed once
    log = (root / "two" / "run.log").read_text().splitlines()
    messages = [line.split(" ", 2)[2] for line in log]
    assert len(messages) == len(set(messages)), "a log line was written twice"
    assert any(m.startswith("after:") for m in messages)
    rows = (root / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == len(set(rows))
    assert not list((root / "two").glob("traceback*"))


def test_a_failing_rank_fails_the_run_with_its_error(tmp_path, tiny_llama, sft_data):
    """A bad data path fails on every rank before training; both exit non-zero, rank 0 reports it, no hang."""
    res = _torchrun(2, *_text_sft_args(tmp_path / "bad", tiny_llama, tmp_path / "missing.jsonl", batch=2),
                    timeout=300)
    assert res.returncode != 0
    report = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert report["status"] == "failed" and "missing.jsonl" in report["error"]


KILLED_RANK = textwrap.dedent("""
    import os, signal, sys
    from transformers import Trainer
    from modaltune.shared.cli import main

    original = Trainer.training_step

    def step(self, *args, **kwargs):
        if os.environ.get("RANK") == "1" and self.state.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 1 dies mid-run, as an out-of-memory kill would
        return original(self, *args, **kwargs)

    Trainer.training_step = step
    sys.exit(main(sys.argv[1:]))
""")


def test_a_rank_killed_mid_run_is_named_in_rank_zeros_failure_line_and_report(tmp_path, tiny_llama, sft_data):
    script = tmp_path / "killed_rank.py"
    script.write_text(KILLED_RANK)
    args = _text_sft_args(tmp_path / "run", tiny_llama, sft_data, batch=2)
    res = _torchrun(2, str(script), *args[2:], "train.max_steps=40", timeout=300)
    assert res.returncode != 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed", report.get("error")
    assert "rank 1 (PID" in report["error"] and "died" in report["error"]
    log = (tmp_path / "run" / "run.log").read_text()
    assert "error: rank 1 (PID" in log
    assert ckpt_problem(tmp_path / "run" / "stages" / "sft" / "checkpoint-2") is None  # the last good one is kept


FSDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    from modaltune.shared.peft import ComponentConfig, ComponentSpec, apply_peft

    def build():  # the core's own LoRA on the tiny LLM, initialised the same on every rank
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
        lora = ComponentConfig(method="lora", r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
        return apply_peft(model, [ComponentSpec("llm", "", lora)])

    def step(model, ids):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.detach()

    torch.manual_seed(1)
    ids = torch.randint(5, 200, (4, 12))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sharded = build()
    for layer in sharded.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    loss = step(sharded, ids[rank::world])
    dist.all_reduce(loss)
    full = {n: p.full_tensor() for n, p in sharded.named_parameters() if p.requires_grad}
    if rank == 0:  # one process, the same step: the mean of the ranks' losses over the whole batch
        ref = build()
        opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
        losses = [ref(input_ids=ids[r::world], labels=ids[r::world]).loss for r in range(world)]
        (sum(losses) / world).backward()
        opt.step()
        diff = max((full[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters() if p.requires_grad)
        moved = max((full[n] - p.detach()).abs().max().item() for n, p in build().named_parameters() if p.requires_grad)
        print(json.dumps({"diff": diff, "moved": moved, "loss": loss.item() / world,
                          "ref_loss": sum(x.item() for x in losses) / world, "sharded": len(full)}))
    dist.barrier()  # rank 1 would otherwise tear gloo down while rank 0 still computes (an abort at exit, seen once)
    dist.destroy_process_group()
""")


def test_fsdp2_sharded_step_matches_one_process(tmp_path, tiny_llama):
    script = tmp_path / "fsdp_step.py"
    script.write_text(FSDP_SCRIPT)
    res = _torchrun(2, str(script), str(tiny_llama), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
    assert got["sharded"] > 0
    assert got["moved"] > 1e-4  # the step changed the adapters, so agreeing below says something
    assert got["diff"] < 1e-6
    assert got["loss"] == pytest.approx(got["ref_loss"], abs=1e-6)


def _med_vqa_args(out: Path, model: Path, vqa: Path, batch: int) -> list[str]:
    return ["-m", "modaltune.shared.cli", "run", "med-vqa", "--out", str(out), "encoder.kind=timm",
            "encoder.name=test_efficientnet", f"model.name={model}", "data.layout=jsonl",
            f"data.train={vqa / 'train.jsonl'}", f"data.test={vqa / 'test.jsonl'}", "data.captions=null",
            "stages[1].max_steps=3", f"train.batch_size={batch}", "train.precision=fp32", "train.logging_steps=1",
            "train.lr=5e-3", "llm.r=4", "llm.dropout=0.0"]


def test_composed_recipe_two_ranks_equal_one_process(tmp_path, tiny_llama, vqa_files):
    """med-vqa (frozen encoder with its feature cache, projector, LoRA LLM) under DDP trains as one process at
    twice the batch and writes one report."""
    two = _torchrun(2, *_med_vqa_args(tmp_path / "two", tiny_llama, vqa_files, batch=2))
    one = _torchrun(1, *_med_vqa_args(tmp_path / "one", tiny_llama, vqa_files, batch=4))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    l2, l1 = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(l2) == len(l1) == 3 and l2 == pytest.approx(l1, abs=1e-5)
    w2 = read_trained(tmp_path / "two" / "checkpoint")
    w1 = read_trained(tmp_path / "one" / "checkpoint")
    assert any(k.startswith("projector.") for k in w1) and w2.keys() == w1.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=0)
    r2 = json.loads((tmp_path / "two" / "report.json").read_text())
    r1 = json.loads((tmp_path / "one" / "report.json").read_text())
    assert r2["metrics"]["after"] == pytest.approx(r1["metrics"]["after"], abs=1e-5)
    assert two.stdout.count("[modaltune] report:") == 1


@pytest.mark.parametrize("env", [
    {"ACCELERATE_USE_FSDP": "true"},
    {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
    {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ZERO3_JSON"},
])
def test_parameter_sharding_is_refused_before_any_work(tmp_path, monkeypatch, capsys, tiny_llama, sft_data, env):
    from modaltune.shared.cli import main

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    for key, value in env.items():
        monkeypatch.setenv(key, str(ds) if value == "ZERO3_JSON" else value)
    out = tmp_path / "run"
    assert main(["run", "text-sft", "--out", str(out), f"model.name={tiny_llama}", f"data.source={sft_data}"]) == 2
    err = capsys.readouterr().err
    assert "shards parameters" in err and "ZeRO-2" in err and "qlora" in err
    assert not out.exists()


def test_zero2_is_not_refused(tmp_path, monkeypatch):
    from modaltune.shared import dist

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    dist.refuse_sharded_parameters()  # raises for stage 3 (above); stage 2 keeps whole parameters
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    dist.refuse_sharded_parameters()
