"""Runs that cannot be silently ruined: a non-finite step stops the run, one run per folder, resume only of the same
run, a full disk said plainly, a regression reported as one, bad --out refused.

Each case reproduces a way a run used to end ``ok`` (or with a raw traceback) and checks what happens now; the
lock and the full disk run in real subprocesses where the behaviour is a process's.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from modaltune.shared import checkpoint as ckpt
from modaltune.shared.cli import main
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.guards import NonFiniteError
from modaltune.shared.recipe import Recipe, register_recipe
from modaltune.shared.run import execute
from modaltune.shared.runfolder import regressions
from modaltune.shared.registry import RECIPES
from modaltune.shared.runfolder import LOCK_FILE, FolderInUse, RunLock
from modaltune.shared.training import StagePlan, TrainConfig, run_stages
from modaltune.text.data import PadCollator

CFG = TrainConfig(max_steps=8, batch_size=4, lr=1e-2, scheduler="constant", warmup_ratio=0.0, save_steps=2,
                  logging_steps=1, precision="fp32", seed=3, report_to=[])


def _train(model, tok, ds, run_dir, cfg, *, config=None, **kw):
    meta = {"recipe": "test", **({"config": config} if config is not None else {})}
    return run_stages(model, [StagePlan("sft", ds)], cfg, run_dir=run_dir, collator=PadCollator(tok.pad_token_id),
                      component_lrs={}, checkpoint_meta=meta, **kw)


def _poison(model, tok, ds, index):
    """Make example ``index`` produce NaN embeddings (as a NaN input would); returns its id."""
    used = {t for item in ds.items for t in item["input_ids"]}
    mark = next(t for t in range(5, len(tok)) if t not in used)
    ds.items[index]["input_ids"][1] = mark
    embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))

    def hook(module, args, out):
        rows = (args[0] == mark).any(dim=1)  # (B,)
        if rows.any():
            out = out.clone()
            out[rows] = float("nan")
        return out

    embedding.register_forward_hook(hook)
    return ds.examples[index].id


def _all_finite(state):
    return all(torch.isfinite(t).all() for t in state.values())


# --- 1. non-finite steps ------------------------------------------------------------------------------------------

def test_a_nan_loss_stops_the_stage_naming_step_and_item_and_keeps_the_good_checkpoint(tmp_path, tiny_llama,
                                                                                       sft_data, lora_sft):
    model, tok, ds = lora_sft(tiny_llama, sft_data)
    bad = _poison(model, tok, ds, 7)
    with pytest.raises(NonFiniteError) as err:
        _train(model, tok, ds, tmp_path / "run", CFG)
    message = str(err.value)
    assert "non-finite loss nan" in message and bad in message and "stage 'sft' stopped at step" in message
    step = int(message.split("stopped at step ")[1].split(":")[0])
    assert _all_finite(model.trained_state_dict())  # the NaN step's update was never applied
    stage_dir = tmp_path / "run" / "stages" / "sft"
    good = ckpt.latest_checkpoint(stage_dir)
    if step > 2:
        assert good is not None and str(good) in message
        assert _all_finite(ckpt.read_trained(good))
    assert not (tmp_path / "run" / "checkpoint").exists()  # no final checkpoint of a ruined run


def test_nonfinite_patience_skips_the_update_and_the_run_goes_on(tmp_path, tiny_llama, sft_data, lora_sft):
    model, tok, ds = lora_sft(tiny_llama, sft_data)
    _poison(model, tok, ds, 7)  # one epoch of 8 steps: the poisoned example is in exactly one batch
    lines: list[str] = []
    result = _train(model, tok, ds, tmp_path / "run", dataclasses.replace(CFG, nonfinite_patience=1),
                    log=lines.append)
    assert result.stages[0]["steps"] == 8
    assert [line for line in lines if "update skipped" in line]
    assert _all_finite(model.trained_state_dict())
    assert _all_finite(ckpt.read_trained(tmp_path / "run" / "checkpoint"))


def _sft(tmp_path, model, data, *extra, out="run"):
    return main(["run", "text-sft", "--out", str(tmp_path / out), f"model.name={model}", f"data.source={data}",
                 "train.max_steps=4", "train.batch_size=4", "train.save_steps=2", "train.logging_steps=1",
                 "eval.max_new_tokens=4", "train.precision=fp32", "train.report_to=[none]", *extra])


def test_nan_and_inf_audio_are_counted_skips_and_the_asr_model_trains_finite(tmp_path, tiny_whisper,
                                                                             speech_manifests):
    import numpy as np
    import soundfile as sf

    rows = [json.loads(x) for x in speech_manifests["train"].read_text().splitlines()]
    folder = speech_manifests["train"].parent
    for name, value in (("nan.wav", float("nan")), ("inf.wav", float("inf"))):
        wave = 0.3 * np.sin(np.arange(16000) / 10).astype(np.float32)
        wave[100:200] = value
        sf.write(tmp_path / name, wave, 16000, subtype="FLOAT")
        rows.append({"audio": str(tmp_path / name), "text": "take metformin twice daily"})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({**r, "audio": str(folder / r["audio"]) if not r["audio"].startswith("/")
                                            else r["audio"]}) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["run", "domain-asr", "--out", str(out), f"model.name={tiny_whisper}", f"data.source={manifest}",
                 f"data.test={speech_manifests['test']}", "data.general=null", "data.terms=null",
                 "train.max_steps=3", "train.batch_size=4", "train.precision=fp32", "eval.max_new_tokens=8",
                 "augment.views=0", "train.report_to=[none]"]) in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["train"]["skip_reasons"]["non-finite samples"] == 2
    assert report["status"] in ("ok", "regressed")
    assert _all_finite(ckpt.read_trained(out / "checkpoint"))


def test_a_diverging_run_ends_failed_not_ok(tmp_path, tiny_llama, sft_data, capsys):
    code = _sft(tmp_path, tiny_llama, sft_data, "train.lr=1e30", "train.scheduler=constant")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert code == 1 and report["status"] == "failed"
    assert "non-finite" in report["error"] and "stopped at step" in report["error"]
    assert not (tmp_path / "run" / "traceback.txt").exists()  # a one-line error, not a traceback
    assert "non-finite" in capsys.readouterr().err


# --- 2. one run per folder ------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from modaltune.shared.runfolder import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_folder_another_live_run_holds_is_refused_and_freed_when_it_dies(tmp_path, tiny_llama, sft_data, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUse, match=rf"PID {holder.pid} .*started .*another --out"):
            RunLock(folder).acquire()
        assert _sft(tmp_path, tiny_llama, sft_data) == 2  # the CLI refuses before any work
        err = capsys.readouterr().err
        assert f"PID {holder.pid}" in err and "in use by another modaltune run" in err
        assert not (folder / "report.json").exists() and not (folder / "run.log").exists()
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    with RunLock(folder):  # stale once its holder is gone
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()


def _cli(out, model, data, *extra):
    return [sys.executable, "-m", "modaltune.shared.cli", "run", "text-sft", "--out", str(out), f"model.name={model}",
            f"data.source={data}", "train.batch_size=4", "train.save_steps=2", "eval.max_new_tokens=4",
            "train.precision=fp32", "train.report_to=[none]", *extra]


def _start_training(out, model, data):
    """A long CLI run in a subprocess, returned once its first checkpoint exists."""
    proc = subprocess.Popen(_cli(out, model, data, "train.max_steps=400"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while not list((out / "stages").glob("*/checkpoint-2")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    return proc


def test_two_cli_runs_in_one_folder_one_is_refused(tmp_path, tiny_llama, sft_data):
    out = tmp_path / "run"
    first = _start_training(out, tiny_llama, sft_data)
    try:
        second = subprocess.run(_cli(out, tiny_llama, sft_data, "train.max_steps=4", "train.seed=7"),
                                capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert second.returncode == 2 and f"PID {first.pid}" in second.stderr, second.stderr[-2000:]
    assert "in use by another modaltune run" in second.stderr and "Traceback" not in second.stderr
    log = (out / "run.log").read_text()
    assert log.count("report:") == 1 and "seed=7" not in log  # the folder holds the first run's lines only
    assert json.loads((out / "report.json").read_text())["config"]["train"]["seed"] == 42


def test_out_that_is_a_file_is_refused_up_front(tmp_path, tiny_llama, sft_data, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert _sft(tmp_path, tiny_llama, sft_data) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert _sft(tmp_path, tiny_llama, sft_data, out="run/inner") == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_out_on_a_read_only_disk_is_refused_up_front(tmp_path, tiny_llama, sft_data, capsys):
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    try:
        assert _sft(tmp_path, tiny_llama, sft_data, out="ro/run") == 2
        err = capsys.readouterr().err
        assert "cannot be created (Read-only file system)" in err and "Traceback" not in err
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_merge_out_that_is_a_file_is_refused(tmp_path, tiny_llama, sft_data, capsys):
    assert _sft(tmp_path, tiny_llama, sft_data) == 0
    target = tmp_path / "merged.bin"
    target.write_text("x")
    assert main(["merge", "--checkpoint", str(tmp_path / "run" / "checkpoint"), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err


# --- 3. resume checks provenance -----------------------------------------------------------------------------------

@pytest.fixture()
def killed_run(tmp_path, tiny_llama, sft_data, lora_sft, crash):
    """A run (seed 3) killed after step 5: complete checkpoints at steps 2 and 4."""
    model, tok, ds = lora_sft(tiny_llama, sft_data)
    config = {"train": dataclasses.asdict(CFG), "data": {"source": str(sft_data)}}
    with pytest.raises(KeyboardInterrupt):
        _train(model, tok, ds, tmp_path / "run", CFG, config=config, callbacks=[crash(5)])
    return tmp_path / "run", config


@pytest.mark.parametrize("change, named", [
    ("seed", "seed: 3 there, 7 now"),
    ("lr", "train.lr: 0.01 there, 0.02 now"),
    ("data", "training data of stage 'sft'"),
])
def test_resume_refuses_a_checkpoint_of_another_run_and_names_the_difference(killed_run, tiny_llama, sft_data,
                                                                             change, named, lora_sft):
    run_dir, config = killed_run
    model, tok, ds = lora_sft(tiny_llama, sft_data)
    cfg = dataclasses.replace(CFG, resume=True)
    if change == "seed":
        cfg = dataclasses.replace(cfg, seed=7)
    elif change == "lr":
        cfg = dataclasses.replace(cfg, lr=2e-2)
    else:
        ds.items = ds.items[:-1]
        ds.examples = ds.examples[:-1]
    config = {**config, "train": dataclasses.asdict(cfg)}
    with pytest.raises(ModaltuneError, match="written by another run") as err:
        _train(model, tok, ds, run_dir, cfg, config=config)
    assert named in str(err.value) and "train.resume_from=" in str(err.value)
    assert ckpt.problem(run_dir / "stages" / "sft" / "checkpoint-4") is None  # nothing of the other run was touched


def test_resume_of_the_same_run_says_where_it_continues(killed_run, tiny_llama, sft_data, lora_sft):
    run_dir, config = killed_run
    model, tok, ds = lora_sft(tiny_llama, sft_data)
    cfg = dataclasses.replace(CFG, resume=True, logging_steps=2)  # how it logs is not what it trains
    lines: list[str] = []
    result = _train(model, tok, ds, run_dir, cfg, config={**config, "train": dataclasses.asdict(cfg)},
                    log=lines.append)
    assert result.stages[0]["resumed_from"].endswith("checkpoint-4")
    assert any("continues from" in line and "checkpoint-4 (step 4 of 8)" in line for line in lines)


def test_resume_from_takes_another_runs_weights_as_a_new_run(killed_run, tmp_path, tiny_llama, sft_data, lora_sft):
    run_dir, config = killed_run
    source = run_dir / "stages" / "sft" / "checkpoint-4"
    model, tok, ds = lora_sft(tiny_llama, sft_data)
    cfg = dataclasses.replace(CFG, seed=7, lr=0.0, resume_from=str(source))  # lr 0: the weights stay as loaded
    lines: list[str] = []
    _train(model, tok, ds, tmp_path / "new", cfg, config={"train": dataclasses.asdict(cfg)}, log=lines.append)
    want = ckpt.read_trained(source)
    got = model.trained_state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert any(line.startswith("resume_from:") and str(source) in line for line in lines)
    with pytest.raises(ModaltuneError, match="not a usable checkpoint"):
        _train(model, tok, ds, tmp_path / "new2", dataclasses.replace(cfg, resume_from=str(tmp_path / "nowhere")))


def test_recipe_resume_with_another_seed_is_refused_end_to_end(tmp_path, tiny_llama, sft_data, capsys):
    assert _sft(tmp_path, tiny_llama, sft_data) == 0
    shutil.rmtree(tmp_path / "run" / "checkpoint")  # as if killed before the end: stage checkpoints remain
    capsys.readouterr()
    assert _sft(tmp_path, tiny_llama, sft_data) == 2  # a plain re-run does not overwrite the unfinished run
    assert "did not finish" in capsys.readouterr().err
    assert _sft(tmp_path, tiny_llama, sft_data, "train.resume=true", "train.seed=7") == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed" and "seed: 42 there, 7 now" in report["error"]
    assert _sft(tmp_path, tiny_llama, sft_data, "train.resume=true") == 0
    assert "resume: stage 'sft'" in (tmp_path / "run" / "run.log").read_text()


# --- 4. out of space -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["checkpoint-4", f"{os.sep}checkpoint{os.sep}"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_half_written_state(tmp_path, tiny_llama, sft_data,
                                                                                  monkeypatch, capsys, where):
    real = ckpt.save_file

    def full(state, path, *args, **kwargs):
        if where in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(state, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full)
    assert _sft(tmp_path, tiny_llama, sft_data) == 1
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "failed"
    assert report["error"].startswith("out of disk space writing") and "needed" in report["error"]
    assert "free" in report["error"] and "train.resume=true" in report["error"]
    assert "out of disk space" in (run / "run.log").read_text()
    assert not (run / "traceback.txt").exists()
    stage = run / "stages" / "sft"
    assert not (stage / "checkpoint-4").exists() or where != "checkpoint-4"  # the half-written one is gone
    assert not (run / "checkpoint").exists()  # so the run never looks finished
    assert ckpt.problem(stage / "checkpoint-2") is None  # the earlier one is kept
    assert not list(run.rglob(".*.tmp"))
    monkeypatch.setattr(ckpt, "save_file", real)
    capsys.readouterr()
    assert _sft(tmp_path, tiny_llama, sft_data) == 2
    assert "did not finish" in capsys.readouterr().err  # not "already holds a finished run"
    assert _sft(tmp_path, tiny_llama, sft_data, "train.resume=true") == 0


def test_a_report_the_disk_cannot_take_goes_to_stderr(tmp_path, tiny_llama, sft_data, monkeypatch, capsys):
    import modaltune.shared.run as run_module

    def full(run_dir, report):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(run_dir) / "report.json"))

    monkeypatch.setattr(run_module, "write_report", full)
    assert _sft(tmp_path, tiny_llama, sft_data) == 0
    err = capsys.readouterr().err
    assert "the report could not be written" in err and '"status": "ok"' in err and "test/loss" in err


MOUNTED = textwrap.dedent("""
    import sys
    from modaltune.shared.cli import main
    model, data, out = sys.argv[1:]
    sys.exit(main(["run", "text-sft", "--out", out, f"model.name={model}", f"data.source={data}",
                   "train.max_steps=6", "train.batch_size=4", "train.save_steps=2", "train.logging_steps=1",
                   "eval.max_new_tokens=4", "train.precision=fp32", "train.report_to=[none]"]))
""")


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk_ends_in_one_line_not_a_traceback(small_disk, tiny_llama, sft_data):
    proc = subprocess.run([sys.executable, "-c", MOUNTED, str(tiny_llama), str(sft_data), str(small_disk / "run")],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr
    assert "out of disk space writing" in proc.stderr + proc.stdout
    assert not list((small_disk / "run").rglob(".*.tmp"))
    assert not (small_disk / "run" / "checkpoint").exists() or \
        ckpt.problem(small_disk / "run" / "checkpoint") is None


# --- 5. regressions -----------------------------------------------------------------------------------------------

class _Worse(Recipe):
    name = "test-worse"
    description = "a recipe whose tuned model measures worse"
    config_cls = TrainConfig
    regression_margins = {"test/wer": 0.02, "test/accuracy": 0.02}

    def run(self, cfg, ctx):
        ctx.report["metrics"] = {"before": {"test/wer": 0.426, "test/accuracy": 0.5},
                                 "after": {"test/wer": 1.0, "test/accuracy": 0.51}}


def test_a_run_that_ends_worse_than_it_began_is_reported_as_a_regression(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_Worse, "default_config_path", lambda self: tmp_path / "worse.yaml")
    (tmp_path / "worse.yaml").write_text("max_steps: 1\n")
    if "test-worse" not in RECIPES._items:  # noqa: SLF001 - registered once per session
        register_recipe(_Worse())
    report, code = execute("test-worse", out=str(tmp_path / "run"))
    assert code == 3 and report["status"] == "regressed"
    assert "test/wer 0.4260 -> 1.0000" in report["regression"] and "accuracy" not in report["regression"]
    assert "Regressed" in (tmp_path / "run" / "report.md").read_text()
    assert regressions({"test/accuracy": 0.8}, {"test/accuracy": 0.79}, {"test/accuracy": 0.02}) == []
    assert regressions({"test/accuracy": 0.8}, {"test/accuracy": float("nan")}, {"test/accuracy": 0.02})


# --- 6. leftovers ---------------------------------------------------------------------------------------------------

def test_a_temp_file_an_interrupted_write_left_is_removed(tmp_path, tiny_llama, sft_data):
    assert _sft(tmp_path, tiny_llama, sft_data) == 0
    stray = tmp_path / "run" / "checkpoint" / ".modaltune.json.x1y2.tmp"
    stray.write_text("{")
    shutil.rmtree(tmp_path / "run" / "stages" / "sft" / "final")
    assert _sft(tmp_path, tiny_llama, sft_data, "train.resume=true") == 0
    assert not stray.exists()
    assert "temporary file(s) an interrupted write left behind" in (tmp_path / "run" / "run.log").read_text()


def test_sigterm_ends_a_single_process_run_as_interrupted_with_its_report(tmp_path, tiny_llama, sft_data):
    out = tmp_path / "run"
    proc = _start_training(out, tiny_llama, sft_data)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted" and "SIGTERM" in report["error"]
