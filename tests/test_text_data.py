"""Instruction data: formats, column mapping, splits, templates and response-only labels."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from modaltune.shared.errors import DataError
from modaltune.text.data import InstructionDataConfig, PadCollator, PromptFormatter, TokenizedDataset, load_splits

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_messages_csv_and_dolly_rows_normalise(tmp_path):
    msgs = _write(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": "oops"},
    ])
    data = load_splits(InstructionDataConfig(source=str(msgs), split=[1.0, 0.0, 0.0]))
    assert [e.response for e in data.examples["train"]] == ["hello"]
    assert data.skipped["train"] == {"last message is not from the assistant": 1, "no messages": 1}

    csv_path = tmp_path / "d.csv"
    csv_path.write_text("question,answer\nWhat is BP?,blood pressure\nEmpty?,\n", encoding="utf-8")
    data = load_splits(InstructionDataConfig(source=str(csv_path), columns={"instruction": "question",
                                                                           "response": "answer"},
                                             split=[1.0, 0.0, 0.0]))
    assert data.examples["train"][0].instruction == "What is BP?"
    assert data.skipped["train"]["empty response"] == 1


def test_datasets_dataset_with_column_mapping(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"q": ["a?", "b?", "c?", "d?"], "a": ["1", "2", "3", "4"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    data = load_splits(InstructionDataConfig(source=f"hf:{tmp_path / 'ds'}", columns={"instruction": "q",
                                                                                       "response": "a"},
                                             split=[0.5, 0.25, 0.25]))
    sizes = {k: len(v) for k, v in data.examples.items()}
    assert sizes == {"train": 2, "validation": 1, "test": 1}
    assert load_splits(InstructionDataConfig(source=f"hf:{tmp_path / 'ds'}", columns={"instruction": "q",
                                                                                       "response": "a"},
                                             split=[0.5, 0.25, 0.25])).examples == data.examples  # fixed seed
    with pytest.raises(DataError, match="cannot load dataset"):
        load_splits(InstructionDataConfig(source="hf:no/such-dataset-offline"))


def test_labels_cover_only_the_response_with_either_template(tiny_llama, sft_data):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    data = load_splits(InstructionDataConfig(source=str(sft_data), split=[1.0, 0.0, 0.0]))
    for template in ("plain", "chat"):
        if template == "chat":
            tok.chat_template = CHAT
        fmt = PromptFormatter(tok, template)
        assert fmt.use_chat == (template == "chat")
        ds = TokenizedDataset(data.examples["train"][:3], fmt, 256, data.skipped["train"])
        item, ex = ds[0], ds.examples[0]
        n_prompt = len(item["prompt_ids"])
        assert item["input_ids"][:n_prompt] == item["prompt_ids"]
        assert all(x == -100 for x in item["labels"][:n_prompt])
        response = [t for t in item["labels"] if t != -100]
        assert response[-1] == tok.eos_token_id
        assert tok.decode(response[:-1]).strip() == ex.response
        if template == "chat":
            assert "<|assistant|>" in fmt.prompt(ex)
    batch = PadCollator(tok.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = int(batch["attention_mask"].sum(1).min())
    row = int(batch["attention_mask"].sum(1).argmin())
    assert (batch["labels"][row, short:] == -100).all()


def test_chat_template_asked_for_but_missing(tiny_llama):
    from modaltune.shared.errors import ConfigError

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    with pytest.raises(ConfigError, match="no chat template"):
        PromptFormatter(tok, "chat")


def test_no_usable_training_rows(tmp_path):
    path = _write(tmp_path / "e.jsonl", [{"instruction": "x", "response": ""}, {"foo": 1}])
    with pytest.raises(DataError, match="no usable training examples.*empty response: 1"):
        load_splits(InstructionDataConfig(source=str(path)))
