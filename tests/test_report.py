"""Run reports: the files written, their content, and comparing two reports."""

from __future__ import annotations

import base64
import errno
import doctest
import json
import re
from pathlib import Path

import pytest

import modaltune.shared.plots as plots_module
import modaltune.shared.spread as spread_module
from modaltune.shared.curve import curve_series
from modaltune.shared.report import write_report
from modaltune.shared.spread import compare_reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def full_report(n_items: int = 3) -> dict:
    """A report with every section filled."""
    items = [
        {"split": "val", "id": i, "prompt": f"q{i}", "reference": "a|b", "before": "x", "after": "y",
         "score_before": 0.0, "score_after": 1.0}
        for i in range(n_items)
    ]
    items[0]["after"] = "<script>alert(1)</script>"
    return {
        "recipe": "vision_lora",
        "status": "ok",
        "error": None,
        "command": "modaltune train vision_lora",
        "run_dir": "/runs/x",
        "started_at": "2025-01-01T00:00:00",
        "finished_at": "2025-01-01T00:10:00",
        "config": {"model": {"name": "tiny", "lora": {"r": 8, "targets": ["q", "v"]}}, "lr": 0.0002},
        "model": {"source": "zoo:tiny", "path": "/models/tiny"},
        "parameters": {"llm": {"trainable": 1_200_000, "total": 120_000_000},
                       "total": {"trainable": 1_200_000, "total": 150_000_000}},
        "data": {"train": {"kept": 90, "skipped": 10, "skip_reasons": {"too_long": 7, "no_image": 3}}},
        "training": {
            "stages": [{"name": "projector", "epochs": 1}, {"name": "lora", "epochs": 2}],
            "curve": [
                {"stage": "projector", "step": 1, "loss": 2.0, "learning_rate": 1e-4},
                {"stage": "projector", "step": 2, "loss": 1.5},
                {"stage": "lora", "step": 1, "loss": 1.2},
                {"stage": "lora", "step": 2, "eval_loss": 1.1},
                {"stage": "lora", "step": 2, "train_runtime": 3.5},
            ],
        },
        "metrics": {"before": {"val/accuracy": 0.5, "val/loss": 2.0},
                    "after": {"val/accuracy": 0.75, "val/loss": 1.0, "val/bleu": 12.5}},
        "timing": {"train": 600.5, "eval": 12.0},
        "memory": {"peak_gpu": 2048.0},
        "items": items,
        "notes": ["first note", "second <b>note</b>"],
    }


def test_full_report_writes_all_files(tmp_path):
    files = write_report(tmp_path, full_report())
    assert set(files) == {"json", "md", "html", "items", "training_curve", "metrics"}
    for path in files.values():
        assert path.parent == tmp_path and path.is_file()
    assert (tmp_path / "training_curve.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "metrics.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    assert all(path.stat().st_mode & 0o777 == 0o644 for path in files.values())


def test_json_round_trips_metrics(tmp_path):
    report = full_report()
    write_report(tmp_path, report)
    loaded = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert loaded["metrics"]["before"] == report["metrics"]["before"]
    assert loaded["metrics"]["after"] == report["metrics"]["after"]
    assert loaded["recipe"] == "vision_lora" and loaded["status"] == "ok"
    assert loaded["files"]["html"] == "report.html"
    assert loaded["files"]["metrics"] == "metrics.png"
    assert "files" not in report, "the caller's dict must not be modified"


def test_html_embeds_png_and_escapes_item_text(tmp_path):
    write_report(tmp_path, full_report())
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    match = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match, "no embedded PNG"
    assert base64.b64decode(match.group(1)).startswith(PNG_MAGIC)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>vision_lora — ok</title>" in page
    assert "second &lt;b&gt;note&lt;/b&gt;" in page
    assert "lora:" in page and "targets:" in page  # config as YAML


def test_markdown_has_metrics_table_with_delta(tmp_path):
    write_report(tmp_path, full_report())
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| metric | before | after | Δ after−before |" in md
    assert "| val/accuracy | 0.5000 | 0.7500 | +0.2500 |" in md
    assert "| val/loss | 2.0000 | 1.0000 | -1.0000 |" in md
    assert "| val/bleu |  | 12.5000 |  |" in md
    assert "![Training curve](training_curve.png)" in md
    assert "![Metrics](metrics.png)" in md
    assert "a\\|b" in md, "pipes inside cells must be escaped"
    assert "<script>" not in md
    assert "too_long: 7; no_image: 3" in md
    assert "| total | 1.2M | 150.0M | 0.800% |" in md


def test_failed_report_with_almost_no_keys(tmp_path):
    report = {"recipe": "asr", "status": "failed", "error": "CUDA out of memory\nTraceback line 2"}
    files = write_report(tmp_path, report)
    assert set(files) == {"json", "md", "html"}
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "CUDA out of memory" in page and "CUDA out of memory" in md
    # The error comes before every other section.
    assert page.index("CUDA out of memory") < page.index("<h2>")
    assert md.index("CUDA out of memory") < md.index("## ")
    assert "class=\"alert\"" in page
    assert json.loads((tmp_path / "report.json").read_text())["error"] == report["error"]
    assert not (tmp_path / "items.jsonl").exists()


def test_failed_without_error_message_still_flagged(tmp_path):
    write_report(tmp_path, {"recipe": "asr", "status": "failed"})
    assert "Run failed" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_empty_sections_write_no_plots(tmp_path):
    report = {"recipe": "dpo", "status": "ok", "training": {"stages": [], "curve": []},
              "metrics": {"before": {}, "after": {}}, "items": [], "plots": [], "notes": [], "config": {}}
    files = write_report(tmp_path, report)
    assert not (tmp_path / "training_curve.png").exists()
    assert not (tmp_path / "metrics.png").exists()
    assert "training_curve" not in files and "metrics" not in files
    assert (tmp_path / "report.html").is_file()


def test_curve_without_losses_writes_no_plot(tmp_path):
    report = {"recipe": "x", "status": "ok",
              "training": {"curve": [{"stage": "s", "step": 10, "train_runtime": 1.0}]}}
    write_report(tmp_path, report)
    assert not (tmp_path / "training_curve.png").exists()


def test_curve_steps_continue_across_stages():
    series = curve_series([
        {"stage": "a", "step": 1, "loss": 3.0},
        {"stage": "a", "step": 5, "loss": 2.0},
        {"stage": "b", "step": 1, "loss": 1.0},
        {"stage": "b", "step": 2, "eval_loss": 0.9},
        {"stage": "c", "step": 20, "loss": 0.5},  # already continues: not shifted
    ])
    assert series["a"]["loss"] == [(1.0, 3.0), (5.0, 2.0)]
    assert series["b"]["loss"] == [(6.0, 1.0)]
    assert series["b"]["eval_loss"] == [(7.0, 0.9)]
    assert series["c"]["loss"] == [(20.0, 0.5)]


def test_items_jsonl_has_all_items_but_pages_show_fifty(tmp_path):
    report = full_report(n_items=120)
    report["items"][60]["prompt"] = "MARKER_BEYOND_FIFTY"
    report["items"][1]["prompt"] = "L" * 1000
    write_report(tmp_path, report)
    lines = (tmp_path / "items.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == report["items"]
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "MARKER_BEYOND_FIFTY" not in page and "MARKER_BEYOND_FIFTY" not in md
    assert "Showing 50 of 120 items" in md
    assert "L" * 299 in md and "L" * 300 not in md
    assert "L" * 299 in page and "L" * 300 not in page
    rows = [line for line in md.splitlines() if line.startswith("| ") and "| val |" in line]
    assert len(rows) == 50


def test_extra_plots_are_embedded(tmp_path):
    write_report(tmp_path / "first", full_report())
    png = (tmp_path / "first" / "metrics.png").read_bytes()
    run = tmp_path / "run"
    run.mkdir()
    (run / "confusion.png").write_bytes(png)
    report = {"recipe": "x", "status": "ok",
              "plots": [{"title": "Confusion", "path": "confusion.png"},
                        {"title": "Absent", "path": str(tmp_path / "nope.png")}]}
    write_report(run, report)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert base64.b64encode(png).decode("ascii") in page
    assert "Missing image" in page
    assert "![Confusion](confusion.png)" in (run / "report.md").read_text(encoding="utf-8")


def test_compare_reports():
    a = {"metrics": {"before": {"m": 0.0}, "after": {"val/acc": 0.5, "val/wer": 0.3}}}
    b = {"metrics": {"after": {"val/acc": 0.75, "test/acc": 0.6}}}
    assert compare_reports(a, b) == {
        "test/acc": (None, 0.6),
        "val/acc": (0.5, 0.75),
        "val/wer": (0.3, None),
    }
    assert compare_reports({}, {"metrics": {}}) == {}


def test_compare_reports_on_written_files(tmp_path):
    first, second = full_report(), full_report()
    second["metrics"]["after"]["val/accuracy"] = 0.9
    write_report(tmp_path / "a", first)
    write_report(tmp_path / "b", second)
    loaded = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("a", "b")]
    assert compare_reports(*loaded)["val/accuracy"] == (0.75, 0.9)


def test_docstring_examples_run():
    result = doctest.testmod(spread_module)
    assert result.attempted >= 1
    assert result.failed == 0


@pytest.mark.parametrize("value", ["not a dict", None, 3])
def test_malformed_sections_are_tolerated(tmp_path, value):
    report = {"recipe": "x", "status": "ok", "metrics": value, "training": value, "items": value,
              "parameters": value, "data": value, "timing": value, "memory": value, "plots": value,
              "notes": value, "model": value}
    files = write_report(tmp_path, report)
    assert {"json", "md", "html"} <= set(files)


def _curve(train: list[float], evals: dict[int, float]) -> list[dict]:
    rows = [{"stage": "sft", "step": i + 1, "loss": v, "learning_rate": 1e-3 * (1 - i / len(train))}
            for i, v in enumerate(train)]
    return rows + [{"stage": "sft", "step": s, "eval_loss": v} for s, v in evals.items()]


@pytest.mark.parametrize("curve, expected", [
    (_curve([2.0, 1.5, 1.0, 0.6, 0.5, 0.4], {2: 1.8, 4: 1.6, 6: 1.9}), "rose from 1.6000 at step 4 to 1.9000"),
    (_curve([2.0, 1.5, 0.8, 0.6, 0.55, 0.52], {3: 2.2, 6: 1.97}), "1.9700 is 3.5 times the training loss 0.5567"),
    (_curve([2.0, 1.5, 1.2, 1.1, 1.05, 1.0], {3: 1.3, 6: 1.15}), None),  # healthy: no notice
])
def test_overfitting_is_flagged_in_every_report_format(tmp_path, curve, expected):
    write_report(tmp_path, {"recipe": "x", "status": "ok", "training": {"curve": curve}})
    payload = json.loads((tmp_path / "report.json").read_text())
    md = (tmp_path / "report.md").read_text()
    if expected is None:
        assert "notices" not in payload and "verfitting" not in md
    else:
        assert len(payload["notices"]) == 1 and expected in payload["notices"][0]
        assert expected in md and expected in (tmp_path / "report.html").read_text()


def test_training_table_rounds_and_leaves_missing_values_empty(tmp_path):
    stages = [{"stage": "sft", "steps": 90, "train_loss": 1.3802870273590089, "resumed": None}]
    write_report(tmp_path, {"recipe": "x", "status": "ok", "training": {"stages": stages}})
    md = (tmp_path / "report.md").read_text()
    assert "1.3803" in md and "1.38028" not in md and "null" not in md and "| 90 |" in md


def test_learning_rate_is_plotted_and_perplexity_not_charted_twice(tmp_path, monkeypatch):
    drawn = {}
    real = plots_module.save_figure

    def keep(fig, path):
        drawn[path.name] = [ax.get_ylabel() or ax.get_title() for ax in fig.axes if ax.get_visible()]
        return real(fig, path)

    monkeypatch.setattr(plots_module, "save_figure", keep)
    metrics = {"before": {"test/loss": 2.0, "test/perplexity": 7.39, "test/rougeL": 0.1},
               "after": {"test/loss": 1.0, "test/perplexity": 2.72, "test/rougeL": 0.3}}
    write_report(tmp_path, {"recipe": "x", "status": "ok", "metrics": metrics,
                            "training": {"curve": _curve([2.0, 1.0], {})}})
    assert drawn["training_curve.png"] == ["loss", "learning rate"]
    assert sorted(drawn["metrics.png"]) == ["test/loss", "test/rougeL"]
    assert "test/perplexity" in (tmp_path / "report.md").read_text()  # still in the table


def test_every_chart_is_written_atomically_and_by_rank_zero_only(tmp_path, monkeypatch):
    """The one figure writer: a failed save leaves the earlier chart whole and no temporary file; only rank 0 writes."""
    import matplotlib.figure

    metrics = {"before": {"a": 1.0}, "after": {"a": 2.0}}
    kw = dict(labels=["a"], legend={"before": "before", "after": "after"}, title="t", ylabel="y")
    path = plots_module.grouped_bars(tmp_path / "bars.png", metrics, ["a"], **kw)
    assert path.read_bytes().startswith(PNG_MAGIC)
    monkeypatch.setenv("RANK", "1")
    assert not plots_module.grouped_bars(tmp_path / "other.png", metrics, ["a"], **kw).exists()
    monkeypatch.setenv("RANK", "0")

    def broken(self, fname, **kwargs):
        Path(fname).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError):
        plots_module.grouped_bars(tmp_path / "bars.png", metrics, ["a"], **kw)
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in tmp_path.iterdir()] == ["bars.png"]
