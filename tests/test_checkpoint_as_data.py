"""A checkpoint is data from someone else, and input rows are named when skipped.

One tiny text-sft run (its data holds a U+2028 line and bad rows) feeds every test here.
"""

from __future__ import annotations

import json
import shutil

import pytest

from modaltune.shared import checkpoint as ckpt
from modaltune.shared.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, sft_data):
    root = tmp_path_factory.mktemp("asdata")
    model = root / "base"
    shutil.copytree(tiny_llama, model)
    (model / "LICENSE.txt").write_text("licence of the base weights\n")
    (model / "GEMMA_TERMS.html").write_text("<p>terms</p>\n")
    rows = [json.loads(line) for line in sft_data.read_text().splitlines()]
    rows[0]["response"] = "Twice daily\u2028(bis in die)."  # valid JSON; str.splitlines() would cut it in two
    rows[1]["response"] = " "
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = root / "run"
    code = main(["run", "text-sft", "--out", str(out), f"model.name={model}", f"data.source={data}",
                 "train.max_steps=2", "train.batch_size=4", "train.save_steps=2", "eval.max_new_tokens=4",
                 "train.precision=fp32", "data.split=[1.0,0.0,0.0]", "data.test=" + str(data),
                 "data.validation=" + str(data), "data.max_length=48"])
    assert code == 0
    return root, out


def _code_bearing_folder(root, source):
    """A model folder whose config asks transformers to import its own ``evil.py``, which leaves a mark."""
    folder = root / "evil-model"
    if not folder.exists():
        shutil.copytree(source, folder)
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "evil.py").write_text(
            f"open({str(root / 'EXECUTED')!r}, 'w').write('code from a checkpoint ran')\n"
            "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n"
        )
    return folder


def _tamper(root, checkpoint, **model):
    """What someone handing over a checkpoint could do: edit its config and write a matching marker."""
    edited = root / f"edited-{len(list(root.glob('edited-*')))}"
    shutil.copytree(checkpoint, edited)
    meta = json.loads((edited / ckpt.META).read_text())
    meta["config"]["model"].update(model)
    (edited / ckpt.META).write_text(json.dumps(meta))
    ckpt.write_marker(edited)
    return edited


def test_a_checkpoint_cannot_turn_on_remote_code(trained, capsys):
    root, out = trained
    evil = _code_bearing_folder(root, root / "base")
    edited = _tamper(root, out / "checkpoint", name=str(evil), trust_remote_code=True)
    assert main(["merge", "--checkpoint", str(edited), "--out", str(root / "merged-evil")]) == 2
    err = capsys.readouterr().err
    assert "asks to run code shipped with its model" in err and "model.trust_remote_code=true" in err
    assert str(evil) in err
    assert main(["eval", "text-sft", "--checkpoint", str(edited), "--out", str(root / "eval-evil")]) == 2
    assert "model.trust_remote_code=true" in capsys.readouterr().err
    assert not (root / "EXECUTED").exists()
    assert not (root / "merged-evil").exists() and not (root / "eval-evil").exists()


def test_the_user_flag_is_the_only_way_to_remote_code(trained):
    from modaltune.shared.recipe import get_recipe
    from modaltune.shared.trust import checkpoint_config

    root, out = trained
    recipe = get_recipe("text-sft")
    edited = _tamper(root, out / "checkpoint", trust_remote_code=True)
    meta = ckpt.read_meta(edited)
    cfg = checkpoint_config(recipe, meta, ["model.trust_remote_code=true"], str(edited))
    assert cfg.model.trust_remote_code is True
    plain = checkpoint_config(recipe, ckpt.read_meta(out / "checkpoint"), [], str(out / "checkpoint"))
    assert plain.model.trust_remote_code is False


def test_a_folder_with_code_is_loaded_without_running_it_and_licences_travel(trained):
    root, out = trained
    evil = _code_bearing_folder(root, root / "base")
    (evil / "LICENSE.txt").write_text("licence of the base weights\n")
    edited = _tamper(root, out / "checkpoint", name=str(evil))  # the path changed, the flag left off
    merged = root / "merged"
    assert main(["merge", "--checkpoint", str(edited), "--out", str(merged)]) == 0
    assert not (root / "EXECUTED").exists()  # transformers' own Llama code ran, never evil.py
    assert (merged / "LICENSE.txt").read_text() == "licence of the base weights\n"
    assert (merged / "GEMMA_TERMS.html").exists()
    record = json.loads((merged / "modaltune-merge.json").read_text())
    assert record["licence_files"] == ["GEMMA_TERMS.html", "LICENSE.txt"]


def test_rows_with_line_separators_load_and_skipped_rows_are_named(trained):
    root, out = trained
    report = json.loads((out / "report.json").read_text())
    train = report["data"]["train"]
    assert train["skip_reasons"]["empty response"] == 1
    assert train["skipped_items"]["empty response"] == ["data.jsonl:2"]
    over = [r for r in train["skip_reasons"] if r.startswith("longer than")]
    assert over and train["skip_reasons"][over[0]] > 5
    assert len(train["skipped_items"][over[0]]) == 5  # the report keeps the first five ...
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    long_rows = [r for r in rows if r["split"] == "train" and r["reason"] == over[0]]
    assert len(long_rows) == train["skip_reasons"][over[0]]  # ... skipped.jsonl names every one
    assert {"split": "train", "reason": "empty response", "item": "data.jsonl:2"} in rows
    assert train["kept"] + train["skipped"] == 40  # the U+2028 row is one row, not two halves
    assert "data.jsonl:2" in (out / "report.md").read_text()
    assert "skipped.jsonl" in (out / "run.log").read_text()


def test_unknown_recipes_list_the_known_ones(capsys):
    assert main(["run", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "known: audio-llm, domain-asr, med-vqa, text-dpo, text-multitask, text-sft" in err
