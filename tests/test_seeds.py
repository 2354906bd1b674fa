"""`modaltune run RECIPE --seeds N`: one run per seed and a summary with mean, std and worst seed."""

from __future__ import annotations

import json
import statistics

import pytest

from modaltune.shared.cli import main
from modaltune.shared.spread import compare_reports


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, tiny_llama, sft_data):
    out = tmp_path_factory.mktemp("seeds") / "run"
    code = main(["run", "text-sft", "--seeds", "3", "--out", str(out), f"model.name={tiny_llama}",
                 f"data.source={sft_data}", "train.max_steps=3", "train.batch_size=4", "train.lr=5e-3",
                 "train.save_steps=100", "eval.max_new_tokens=4", "train.precision=fp32", "llm.dropout=0.1"])
    assert code == 0
    return out


def test_each_seed_runs_with_its_own_seed_and_the_same_held_out_split(seeded):
    runs = {seed: json.loads((seeded / f"seed-{seed}" / "report.json").read_text()) for seed in (42, 43, 44)}
    assert {seed: r["config"]["train"]["seed"] for seed, r in runs.items()} == {42: 42, 43: 43, 44: 44}
    tests = [[item["id"] for item in r["items"]] for r in runs.values()]
    assert sorted(tests[0]) == sorted(tests[1]) == sorted(tests[2])  # the held-out split does not move
    losses = {r["metrics"]["after"]["test/loss"] for r in runs.values()}
    assert len(losses) == 3  # data order, initialisation and dropout differ


def test_the_summary_holds_mean_std_and_worst_seed_of_every_metric(seeded):
    summary = json.loads((seeded / "report.json").read_text())
    runs = [json.loads((seeded / f"seed-{s}" / "report.json").read_text()) for s in summary["seeds"]]
    assert summary["seeds"] == [42, 43, 44] and summary["status"] == "ok"
    metrics = summary["metrics"]
    for key in ("test/loss", "test/rougeL", "validation/loss"):
        values = [r["metrics"]["after"][key] for r in runs]
        assert metrics["after_mean"][key] == pytest.approx(statistics.mean(values))
        assert metrics["after_std"][key] == pytest.approx(statistics.stdev(values))
        assert metrics["after_min"][key] == min(values) and metrics["after_max"][key] == max(values)
        assert set(metrics["after_mean"]) == set(runs[0]["metrics"]["after"])
    losses = [r["metrics"]["after"]["test/loss"] for r in runs]
    rouge = [r["metrics"]["after"]["test/rougeL"] for r in runs]
    assert metrics["after_worst"]["test/loss"] == max(losses)  # lower is better
    assert metrics["after_worst"]["test/rougeL"] == min(rouge)  # higher is better
    assert [row["seed"] for row in summary["runs"]] == [42, 43, 44]
    single = runs[0]
    pairs = compare_reports(single, summary, "worst")
    assert pairs["test/loss"] == (single["metrics"]["after"]["test/loss"], max(losses))
    assert compare_reports(single, summary)["test/loss"][1] == pytest.approx(statistics.mean(losses))
    page = (seeded / "report.md").read_text()
    assert "## Seeds" in page and "after_worst" in page and "metrics.png" in page
    assert "torch_threads" in page  # every report says what it ran on


def test_seed_lists_and_bad_values(tmp_path, capsys):
    from modaltune.shared.seeds import parse_seeds

    assert parse_seeds("5,1", 42) == [5, 1]
    assert main(["run", "text-sft", "--seeds", "two", "--out", str(tmp_path / "x")]) == 2
    assert "--seeds 'two': give a count" in capsys.readouterr().err


def test_resume_reuses_finished_seeds_of_the_same_config_only(seeded, tmp_path, tiny_llama, sft_data, capsys):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(seeded, out)
    base = ["run", "text-sft", "--seeds", "2", "--out", str(out), f"model.name={tiny_llama}", f"data.source={sft_data}",
            "train.max_steps=3", "train.batch_size=4", "train.lr=5e-3", "train.save_steps=100",
            "eval.max_new_tokens=4", "train.precision=fp32", "llm.dropout=0.1", "train.resume=true"]
    assert main(base) == 0
    assert capsys.readouterr().out.count("finished earlier, its report is reused") == 2
    summary = json.loads((out / "report.json").read_text())
    assert summary["seeds"] == [42, 43] and summary["status"] == "ok"
    # another config must not be mixed with the runs already there
    assert main([*base, "train.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "seed-42 finished with another config (train.lr: 0.005 there, 0.001 now)" in err
