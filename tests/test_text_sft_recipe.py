"""End-to-end: `modaltune run/eval/merge text-sft` on a tiny random model, in-process."""

from __future__ import annotations

import json

import pytest
import torch

from modaltune.shared.cli import main


def _run(tmp_path, model, data, *extra):
    out = tmp_path / "run"
    code = main([
        "run", "text-sft", "--out", str(out), f"model.name={model}", f"data.source={data}",
        "train.max_steps=4", "train.batch_size=4", "train.save_steps=2", "train.logging_steps=1",
        "eval.max_new_tokens=6", "train.precision=fp32", *extra,
    ])
    return code, out


def test_run_writes_reports_with_before_and_after(tmp_path, tiny_llama, sft_data):
    code, out = _run(tmp_path, tiny_llama, sft_data)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert set(before) == set(after)
    for key in ("test/loss", "test/perplexity", "test/exact_match", "test/rougeL", "validation/loss"):
        assert key in after
    assert after["test/loss"] != before["test/loss"]
    assert report["parameters"]["llm"]["trainable"] > 0
    assert report["parameters"]["llm"]["trainable"] < report["parameters"]["llm"]["total"]
    assert report["data"]["train"]["kept"] == 32
    assert (out / "report.html").read_text().count("data:image/png;base64") >= 1
    assert (out / "report.md").exists() and (out / "config.yaml").exists()
    assert (out / "checkpoint" / "COMPLETE").exists()
    assert len(report["items"]) == report["data"]["test"]["kept"]
    # the headline figures are what the report's own rows give: ROUGE-L of each row's text, exact match per row
    from modaltune.shared.metrics import rouge_l

    items = report["items"]
    refs = [it["reference"] for it in items]
    for column, metrics in (("before", before), ("after", after)):
        scores = rouge_l([it[column] for it in items], refs)
        assert metrics["test/rougeL"] == pytest.approx(sum(scores) / len(items), abs=1e-12), column
    assert after["test/rougeL"] == pytest.approx(sum(it["rougeL_after"] for it in items) / len(items), abs=1e-4)
    assert after["test/exact_match"] == sum(it["exact_after"] for it in items) / len(items)
    assert json.loads((out / "items.jsonl").read_text().splitlines()[0]) == items[0]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows)


def test_eval_and_merge_reproduce_the_trained_model(tmp_path, tiny_llama, sft_data):
    from transformers import AutoModelForCausalLM

    from modaltune.shared import checkpoint as ckpt
    from modaltune.shared.recipe import get_recipe

    code, out = _run(tmp_path, tiny_llama, sft_data, "train.lr=1e-2")
    assert code == 0
    trained = json.loads((out / "report.json").read_text())["metrics"]["after"]

    code = main(["eval", "text-sft", "--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / "ev"),
                 "eval.max_new_tokens=6"])
    assert code == 0
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert ev["metrics"]["after"]["test/loss"] == pytest.approx(trained["test/loss"], rel=1e-5)

    merged = tmp_path / "merged"
    assert main(["merge", "--checkpoint", str(out / "checkpoint"), "--out", str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(str(merged)).eval()

    from modaltune.shared.config import from_dict
    from modaltune.shared.lm import build_text_model

    cfg = from_dict(get_recipe("text-sft").config_cls, ckpt.read_meta(out / "checkpoint")["config"])
    model, tok, _ = build_text_model(cfg.model, cfg.llm, compute_dtype=torch.float32, log_fn=lambda *_: None)
    ckpt.load_trained(model, out / "checkpoint")
    model.eval()
    ids = tok(["Expand the clinical abbreviation: BID"], return_tensors="pt")
    with torch.no_grad():
        a = model.llm(**ids).logits
        b = plain(**ids).logits
    assert torch.allclose(a, b, atol=1e-4)


def _weights_stored_once_and_the_peft_folder_loads(checkpoint, base):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from modaltune.shared import checkpoint as ckpt

    own = load_file(str(checkpoint / ckpt.WEIGHTS))
    everything = ckpt.read_trained(checkpoint)
    lora = [k for k in everything if "lora_" in k]
    assert lora and not [k for k in own if "lora_" in k]  # the LoRA tensors live only in the PEFT folder
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)),
                                           str(checkpoint / "adapter" / "llm")).eval()
    loaded = dict(peft_model.named_parameters())
    for name in lora:  # the plain PEFT folder holds exactly the trained tensors
        local = name.split(".", 1)[1]  # drop the component root ("llm.")
        assert torch.equal(loaded[local], everything[name]), name


def test_merged_model_chats_in_its_trained_format_with_plain_transformers(tmp_path, tiny_llama, sft_data, capsys):
    """The merged folder carries the prompt format (chat template), greedy decoding that stops at EOS, the dtype
    asked for; `modaltune generate` and a plain transformers chat give the same answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modaltune.text.data import Example, PromptFormatter

    code, out = _run(tmp_path, tiny_llama, sft_data, "train.lr=1e-2")
    assert code == 0
    adapter = json.loads((out / "checkpoint" / "adapter" / "llm" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_llama)  # as the user named it, not a cache path
    _weights_stored_once_and_the_peft_folder_loads(out / "checkpoint", tiny_llama)
    half = tmp_path / "merged-bf16"
    assert main(["merge", "--checkpoint", str(out / "checkpoint"), "--out", str(half), "--dtype", "bf16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(str(half)).dtype == torch.bfloat16
    record = json.loads((half / "modaltune-merge.json").read_text())
    assert record["base_model"] == str(tiny_llama) and record["dtype"] == "bf16"
    merged = tmp_path / "merged"  # trained in fp32 (the default --dtype): compared with the checkpoint's answer
    assert main(["merge", "--checkpoint", str(out / "checkpoint"), "--out", str(merged)]) == 0
    tok = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    assert model.dtype == torch.float32
    question = "Expand the clinical abbreviation: BID"
    trained_prompt = PromptFormatter(AutoTokenizer.from_pretrained(str(tiny_llama)), "plain").encode(
        Example("q", [{"role": "user", "content": question}], "", instruction=question))[0]
    chat = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]
    assert list(chat) == trained_prompt  # the chat template reproduces the training prompt token for token
    gen = model.generation_config
    assert gen.do_sample is False and gen.max_new_tokens == 6 and tok.eos_token_id in list(gen.eos_token_id)
    with torch.no_grad():
        ids = model.generate(torch.tensor([chat]))[0, len(chat):]
    answer = tok.decode(ids, skip_special_tokens=True).strip()
    from transformers import pipeline

    chat = pipeline("text-generation", model=str(merged))  # the README's three lines
    said = chat([{"role": "user", "content": question}])[0]["generated_text"][-1]
    assert said["role"] == "assistant" and said["content"].strip() == answer

    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out / "checkpoint"), question]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed and printed == answer
    assert main(["generate", "--checkpoint", str(out / "checkpoint")]) == 2  # a prompt is required
    assert "give one or more prompts" in capsys.readouterr().err


def test_bad_inputs_give_one_line_errors_and_a_run_folder(tmp_path, tiny_llama, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{not json\n', encoding="utf-8")
    code, out = _run(tmp_path, tiny_llama, bad)
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed"
    assert "bad.jsonl:2" in report["error"] and "invalid JSON" in report["error"]
    assert "Traceback" not in capsys.readouterr().err


def test_missing_file_unknown_model_and_unknown_key(tmp_path, tiny_llama, capsys):
    code, out = _run(tmp_path, tiny_llama, tmp_path / "nope.jsonl")
    assert code == 1
    assert "nope.jsonl" in json.loads((out / "report.json").read_text())["error"]

    code = main(["run", "text-sft", "--out", str(tmp_path / "r2"), "model.name=no-such-model-xyz"])
    assert code == 1
    err = json.loads((tmp_path / "r2" / "report.json").read_text())["error"]
    assert "no-such-model-xyz" in err and "gemma-3-270m" in err

    code = main(["run", "text-sft", "--out", str(tmp_path / "r3"), "train.max_stpes=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.max_stpes" in err and "max_steps" in err
    assert not (tmp_path / "r3").exists()


def test_empty_responses_are_counted_skips(tmp_path, tiny_llama, sft_data):
    data = tmp_path / "d.jsonl"
    lines = sft_data.read_text().splitlines()
    lines.append(json.dumps({"instruction": "Say nothing", "context": "", "response": "  "}))
    data.write_text("\n".join(lines) + "\n")
    code, out = _run(tmp_path, tiny_llama, data, "data.max_length=40")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    reasons = report["data"]["train"]["skip_reasons"]
    assert reasons.get("empty response") == 1
    total_long = sum(v for s in report["data"].values() for k, v in s["skip_reasons"].items() if "max_length" in k)
    assert total_long > 0


def test_eval_during_training_early_stopping_and_gradient_checkpointing(tmp_path, tiny_llama, sft_data):
    code, out = _run(tmp_path, tiny_llama, sft_data, "train.max_steps=8", "train.eval_steps=1",
                     "train.early_stopping_patience=2", "train.lr=0.0", "train.gradient_checkpointing=true")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    evals = [r for r in report["training"]["curve"] if "eval_loss" in r]
    assert report["training"]["stages"][0]["steps"] == 3  # lr 0: no improvement after the first evaluation
    assert len(evals) >= 3


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, tiny_llama, sft_data):
    """Recomputing activations in the backward pass changes memory, not arithmetic: at a real learning rate the
    run with checkpointing logs the same losses and gradient norms and ends at the same weights (to float
    tolerance) as the run without, and those weights did move."""
    from modaltune.shared import checkpoint as ckpt

    runs = {}
    for gc in ("false", "true"):
        code, out = _run(tmp_path / f"gc-{gc}", tiny_llama, sft_data, "train.lr=1e-2",
                         f"train.gradient_checkpointing={gc}", "train.max_steps=3", "eval.max_examples=1")
        assert code == 0
        report = json.loads((out / "report.json").read_text())
        steps = [r for r in report["training"]["curve"] if "loss" in r and "grad_norm" in r]
        runs[gc] = (report, steps, ckpt.read_trained(out / "checkpoint"))
    (plain, plain_steps, plain_w), (gc, gc_steps, gc_w) = runs["false"], runs["true"]
    assert [r["step"] for r in gc_steps] == [r["step"] for r in plain_steps] == [1, 2, 3]
    for a, b in zip(plain_steps, gc_steps):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert set(gc_w) == set(plain_w) and plain_w
    for name, tensor in plain_w.items():
        assert torch.allclose(gc_w[name], tensor, rtol=1e-4, atol=1e-6), name
    assert any(t.abs().max() > 0 for n, t in gc_w.items() if "lora_B" in n)  # LoRA's B starts at zero
    after, before = gc["metrics"]["after"]["test/loss"], gc["metrics"]["before"]["test/loss"]
    assert after != before and after == pytest.approx(plain["metrics"]["after"]["test/loss"], rel=1e-5)


def test_quantisation_unavailable_is_one_clear_line(tmp_path, tiny_llama, sft_data, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("no bitsandbytes here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    code, out = _run(tmp_path, tiny_llama, sft_data, "llm.method=qlora")
    assert code == 1
    err = json.loads((out / "report.json").read_text())["error"]
    assert "qlora needs bitsandbytes" in err and "method: lora" in err


def test_trackers_get_the_curve_and_the_before_after_metrics(tmp_path, tiny_llama, sft_data, monkeypatch, capsys):
    """TensorBoard (built in) and W&B (offline) receive the before/after metrics; a tracker whose package is
    missing or a misspelt one is refused before any work."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    code, out = _run(tmp_path, tiny_llama, sft_data, "train.report_to=[tensorboard,wandb]")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    after = events.Scalars("after/test/loss")
    assert after[0].value == pytest.approx(report["metrics"]["after"]["test/loss"], rel=1e-6)
    assert "before/test/rougeL" in events.Tags()["scalars"]
    assert list((out / "stages" / "sft").glob("runs/*/events.out.tfevents.*"))  # the Trainer's training curve
    runs = list((tmp_path / "wandb").rglob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs  # one W&B run: the Trainer's curve and the results together
    records = runs[0].read_bytes()  # protobuf records: keys and JSON values are stored as written
    after_loss = json.dumps(report["metrics"]["after"]["test/loss"]).encode()
    assert b"after/test/loss" in records and after_loss in records and b"train/loss" in records

    capsys.readouterr()
    assert main(["run", "text-sft", "--out", str(tmp_path / "x"), "train.report_to=[tensorbord]"]) == 2
    assert "unknown tracker 'tensorbord'" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    assert main(["run", "text-sft", "--out", str(tmp_path / "y"), "train.report_to=[mlflow]"]) == 2
    assert "pip install mlflow" in capsys.readouterr().err


def test_one_validation_loss_per_split(tmp_path, tiny_llama, sft_data):
    """The training curve's evaluation at the last step and the report's validation/loss are the same figure
    (both the mean over every labelled token of the split)."""
    code, out = _run(tmp_path, tiny_llama, sft_data, "train.eval_steps=2", "train.eval_batch_size=3",
                     "train.lr=1e-2")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    evals = [r for r in report["training"]["curve"] if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and evals[0]["eval_loss"] != evals[1]["eval_loss"]
    assert evals[-1]["eval_loss"] == pytest.approx(report["metrics"]["after"]["validation/loss"], rel=1e-6)


def test_packed_training_runs_end_to_end(tmp_path, tiny_llama, sft_data):
    code, out = _run(tmp_path, tiny_llama, sft_data, "data.packing=true", "data.max_length=160", "train.batch_size=2")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and 0 < report["data"]["train"]["packed_rows"] < report["data"]["train"]["kept"]
    assert report["metrics"]["after"]["test/loss"] != report["metrics"]["before"]["test/loss"]


def test_half_fine_tuning_runs_and_merges(tmp_path, tiny_llama, sft_data):
    from transformers import AutoModelForCausalLM

    code, out = _run(tmp_path, tiny_llama, sft_data, "llm.method=hft", "train.lr=1e-3")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    drawn = report["training"]["stages"][0]["half_fine_tuning"]["llm"]
    assert 0.4 < drawn["block_fraction"] < 0.6
    assert report["metrics"]["after"]["test/loss"] != report["metrics"]["before"]["test/loss"]
    assert main(["merge", "--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all(".layers." in n for n in changed)  # embeddings and head untouched


@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca.parquet"])
def test_other_data_formats_train_end_to_end(tmp_path, tiny_llama, sft_data, fmt):
    rows = [json.loads(line) for line in sft_data.read_text().splitlines()]
    if fmt == "sharegpt":  # two-turn conversations: the loss covers both assistant turns
        data = tmp_path / "chats.jsonl"
        data.write_text("".join(json.dumps({"conversations": [
            {"from": "human", "value": a["instruction"]}, {"from": "gpt", "value": a["response"]},
            {"from": "human", "value": b["instruction"]}, {"from": "gpt", "value": b["response"]}]}) + "\n"
            for a, b in zip(rows[::2], rows[1::2])))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = tmp_path / "alpaca.parquet"
        pq.write_table(pa.Table.from_pylist([{"instruction": r["instruction"], "input": r.get("context", ""),
                                              "output": r["response"]} for r in rows]), data)
    code, out = _run(tmp_path, tiny_llama, data, "data.max_length=256")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["data"]["train"]["kept"] > 0 and not report["data"]["train"]["skipped"]
    assert report["model"]["prompt_style"] == ("conversation" if fmt == "sharegpt" else "instruction")
