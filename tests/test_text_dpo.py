"""text-dpo: the built-in pairs, pair reading, and `modaltune run/eval/merge text-dpo` on a tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modaltune.shared.cli import main
from modaltune.shared.errors import DataError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_pairs_are_what_the_script_writes():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_clinical_pref.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_builtin_pairs_keep_every_sft_test_prompt_out_of_training():
    from modaltune.text.data import InstructionDataConfig, load_splits
    from modaltune.text.preference import PairDataConfig, load_pairs

    pairs, _ = load_pairs(PairDataConfig())
    sft = load_splits(InstructionDataConfig()).examples
    prompts = {s: {p.example.messages[0]["content"] for p in pairs[s]} for s in pairs}
    assert prompts["test"] and not prompts["test"] & prompts["train"]
    assert prompts["test"] == {ex.messages[0]["content"] for ex in sft["test"]}
    assert all(p.rejected != p.example.response and p.failure for s in pairs for p in pairs[s])


def test_pair_forms_are_read_and_bad_rows_counted(tmp_path):
    from modaltune.text.preference import PairDataConfig, load_pairs

    rows = [
        {"prompt": "Say hi", "chosen": "hi", "rejected": "bye"},  # standard
        {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": [{"role": "assistant", "content": "hi"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},  # conversational, explicit prompt
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]},  # implied prompt
        {"question": "What is 2+2?", "good": "4", "bad": "5"},  # mapped columns
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": "x", "chosen": "only"},
        {"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "1"}],
         "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "2"}]},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PairDataConfig(source=str(path), split=[1.0, 0.0, 0.0],
                         columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    pairs, skipped = load_pairs(cfg)
    assert [p.example.response for p in pairs["train"]] == ["4"]  # the map renames every row's fields
    pairs, skipped = load_pairs(PairDataConfig(source=str(path), split=[1.0, 0.0, 0.0]))
    got = sorted((p.example.messages[-1]["content"], p.example.response, p.rejected) for p in pairs["train"])
    assert got == [("Q", "good", "bad"), ("Say hi", "hi", "bye"), ("Say hi", "hi", "go away")]
    reasons = dict(skipped["train"])
    assert reasons == {"chosen and rejected are the same answer": 1, "missing chosen or rejected field": 2,
                       "chosen and rejected continue different conversations": 1}
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match="no usable training pairs"):
        load_pairs(PairDataConfig(source=str(path)))


def _run(out, model, sft, pairs, *extra):
    return main(["run", "text-dpo", "--out", str(out), f"model.name={model}", f"data.source={sft}",
                 f"pairs.source={pairs}", "stages[0].max_steps=4", "stages[1].max_steps=4", "train.batch_size=4",
                 "train.save_steps=2", "train.logging_steps=1", "eval.max_new_tokens=4", "train.precision=fp32",
                 "stages[1].lr=5e-3", *extra])


def test_sft_then_dpo_reports_preferences_and_reloads(tmp_path, tiny_llama, sft_data, pair_data):
    out = tmp_path / "run"  # tested on its training pairs: a tiny random model learns them, it does not generalise
    assert _run(out, tiny_llama, sft_data, pair_data, f"pairs.test={pair_data}", "stages[1].max_steps=8") == 0
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    assert list(metrics) == ["before", "after_sft", "after"]
    for key in ("test/preference_accuracy", "test/reward_margin", "test/logp_accuracy", "test/rougeL", "test/loss"):
        assert key in metrics["after"]
    # the reference is the model as DPO starts (after SFT): rewards there are exactly zero
    assert metrics["after_sft"]["test/reward_margin"] == 0 and metrics["after_sft"]["test/preference_accuracy"] == 0
    assert metrics["after"]["test/reward_margin"] > 0
    curve = [r for r in report["training"]["curve"] if r.get("stage") == "dpo" and "rewards/margins" in r]
    assert curve and curve[0]["step"] == 1 and curve[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    pairs = [r for r in report["items"] if "pair" in r]
    assert len(pairs) == report["data"]["pairs_test"]["kept"] > 0
    assert {"failure", "margin_after", "margin_after_sft"} <= set(pairs[0])
    # the preference figures are what the report's own pair rows give (margins are rounded to 4 decimals there)
    margins = [r["margin_after"] for r in pairs]
    assert metrics["after"]["test/preference_accuracy"] == pytest.approx(sum(x > 0 for x in margins) / len(margins),
                                                                         rel=1e-6)  # a float32 mean
    assert metrics["after"]["test/reward_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    from modaltune.shared.metrics import rouge_l

    texts = [r for r in report["items"] if "pair" not in r]
    scores = rouge_l([r["after"] for r in texts], [r["reference"] for r in texts])
    assert metrics["after"]["test/rougeL"] == pytest.approx(sum(scores) / len(texts), abs=1e-12)
    ckpt_dir = out / "checkpoint"
    assert not (ckpt_dir / "adapter" / "llm" / "ref").exists()  # trl's frozen reference is not a trained weight

    # eval rebuilds the reference from the run's SFT stage and gets the same preference figures
    assert main(["eval", "text-dpo", "--checkpoint", str(ckpt_dir), "--out", str(tmp_path / "ev"),
                 "eval.max_new_tokens=4"]) == 0
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())["metrics"]["after"]
    for key in ("test/reward_margin", "test/preference_accuracy", "test/loss"):
        assert ev[key] == pytest.approx(metrics["after"][key], rel=1e-4, abs=1e-6)
    assert main(["merge", "--checkpoint", str(ckpt_dir), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").exists()


def test_dpo_from_an_sft_checkpoint_and_resume(tmp_path, tiny_llama, sft_data, pair_data):
    sft = tmp_path / "sft"
    assert main(["run", "text-sft", "--out", str(sft), f"model.name={tiny_llama}", f"data.source={sft_data}",
                 "train.max_steps=3", "train.batch_size=4", "eval.max_new_tokens=2", "train.precision=fp32",
                 "llm.r=4"]) == 0
    out = tmp_path / "dpo"
    assert _run(out, tiny_llama, sft_data, pair_data, f"init.checkpoint={sft / 'checkpoint'}") == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["metrics"]) == ["before", "after"]
    assert [s["stage"] for s in report["training"]["stages"]] == ["dpo"]
    sft_after = json.loads((sft / "report.json").read_text())["metrics"]["after"]
    assert report["metrics"]["before"]["test/loss"] == pytest.approx(sft_after["test/loss"], rel=1e-5)
    assert report["metrics"]["before"]["test/reward_margin"] == 0
    # a resumed run continues from its last complete checkpoint to the same weights
    from modaltune.shared import checkpoint as ckpt

    (out / "stages" / "dpo" / "final" / "COMPLETE").unlink()
    import shutil

    shutil.rmtree(out / "stages" / "dpo" / "checkpoint-4")
    first = ckpt.read_trained(out / "checkpoint")
    assert _run(out, tiny_llama, sft_data, pair_data, f"init.checkpoint={sft / 'checkpoint'}",
                "train.resume=true") == 0
    again = ckpt.read_trained(out / "checkpoint")
    assert set(first) == set(again) and all((first[k] - again[k]).abs().max() < 1e-6 for k in first)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_answer_only_head_matches_trls_fused_head(kind, tiny_llama, tiny_gemma, monkeypatch):
    import torch
    import trl.trainer.utils as trl_utils
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from modaltune.text.preference import _score_answers_only

    folder = tiny_llama if kind == "llama" else tiny_gemma
    outs = []
    for patch in (False, True):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_pretrained(str(folder))
        add_fused_lm_head(lm, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        if patch:  # trl's every-position kernel must not run any more
            _score_answers_only(lm)
            monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", None)
        peft = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        ids = torch.randint(3, 200, (3, 12))
        labels = ids.clone()
        labels[:, :6] = -100
        labels[1, 9:] = -100
        out = peft(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        grads = [p.grad.clone() for p in peft.parameters() if p.requires_grad]
        outs.append((out, grads))
    (a, ga), (b, gb) = outs
    for field in ("log_probs", "entropy", "mean_logits"):
        assert torch.allclose(getattr(a, field), getattr(b, field), atol=1e-5), field
    assert torch.equal(a.is_top1.bool(), b.is_top1.bool()) and torch.equal(a.label_mask, b.label_mask)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb))
