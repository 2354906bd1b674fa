"""text-multitask end to end on a tiny model: task adapters, their combinations, the joint adapter, per-task scores."""

from __future__ import annotations

import json

import pytest

from modaltune.shared.cli import main


def _run(tmp_path, tiny_llama, name, *extra):
    out = tmp_path / name
    code = main(["run", "text-multitask", "--out", str(out), f"model.name={tiny_llama}", "train.max_steps=2",
                 "train.batch_size=4", "train.save_steps=2", "eval.max_new_tokens=3", "train.precision=fp32",
                 "data.split=[0.8,0.1,0.1]", "train.lr=1e-2", *extra])
    return code, out


def test_every_task_is_scored_by_every_adapter(tmp_path, tiny_llama):
    code, out = _run(tmp_path, tiny_llama, "lora")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    tasks = ["abbreviation", "lab", "discharge"]
    columns = ["before", *tasks, "joint", "cat", "linear", "svd", "ties", "dare"]
    assert list(report["metrics"]) == columns
    for column in columns:
        for task in tasks:
            assert f"{task}/loss" in report["metrics"][column] and f"{task}/rougeL" in report["metrics"][column]
    for task in tasks:  # each task adapter trained on its own task: its loss there beats no adapter
        assert report["metrics"][task][f"{task}/loss"] < report["metrics"]["before"][f"{task}/loss"]
    stages = {s["stage"]: s["steps"] for s in report["training"]["stages"]}
    assert stages == {"abbreviation": 2, "lab": 2, "discharge": 2, "joint": 6}
    combos = report["combinations"]
    assert combos["cat"]["relative_error"] < 1e-6 and combos["cat"]["output"]["ranks"] == [48]
    assert combos["svd"]["output"]["ranks"] == [16] and combos["linear"]["relative_error"] > 1e-4
    for how in ("cat", "linear", "svd", "ties", "dare"):
        assert (out / "combined" / how / "adapter_config.json").is_file()
        assert (out / "combined" / how / "combine.md").is_file()
    assert (out / "adapters" / "lab" / "checkpoint" / "COMPLETE").is_file()
    assert report["target"]["method"] == "cat" and "kept" in report["target"]
    assert (out / "tasks.png").is_file() and "Per-task rougeL" in (out / "report.md").read_text()
    rows = report["items"]
    assert rows and all(c in rows[0] for c in columns)
    # every per-task score is what the report's own rows give: ROUGE-L of that column's text on that task's rows
    from modaltune.shared.metrics import rouge_l

    for task in tasks:
        part = [r for r in rows if r["category"] == task]
        assert part, task
        for column in columns:
            scores = rouge_l([r[column] for r in part], [r["reference"] for r in part])
            assert report["metrics"][column][f"{task}/rougeL"] == pytest.approx(sum(scores) / len(part), abs=1e-12)
    for task in tasks:  # kept: a combination's score over the task's own adapter's (where that is not 0)
        own = report["metrics"][task][f"{task}/rougeL"]
        for column in ("cat", "linear", "svd", "ties", "dare", "joint"):
            kept = report["metrics"][column].get(f"{task}/kept")
            assert kept is None if own == 0 else kept == pytest.approx(report["metrics"][column][f"{task}/rougeL"] / own)


def test_lora_fa_task_adapters_share_a_so_linear_is_exact(tmp_path, tiny_llama):
    code, out = _run(tmp_path, tiny_llama, "fa", "llm.method=lora_fa", "combine.methods=[cat,linear]",
                     "combine.weights=[0.5,0.3,0.2]")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["combinations"]["linear"]["relative_error"] < 1e-6  # the same A in every task adapter
    assert report["combinations"]["linear"]["output"]["ranks"] == [16]
    cat, linear = report["metrics"]["cat"], report["metrics"]["linear"]
    for key in ("abbreviation/loss", "lab/loss", "discharge/loss"):
        assert linear[key] == pytest.approx(cat[key], abs=1e-4)


def test_bad_task_settings_are_one_line_errors(tmp_path, tiny_llama, capsys):
    code, _ = _run(tmp_path, tiny_llama, "x", "tasks.names=[abbreviation,radiology]")
    assert code == 1 and "['radiology']" in capsys.readouterr().err  # found at run time, in the report too
    code, _ = _run(tmp_path, tiny_llama, "y", "llm.method=ia3")
    assert code == 2 and "LoRA-family" in capsys.readouterr().err
    code, _ = _run(tmp_path, tiny_llama, "z", "combine.weights=[1.0]")
    assert code == 2 and "one per task" in capsys.readouterr().err
