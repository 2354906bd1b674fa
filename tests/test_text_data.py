"""Instruction data: formats, column mapping, splits, templates and response-only labels."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from modaltune.shared.errors import DataError
from modaltune.shared.skips import Skips
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


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is BP?"},
                {"role": "assistant", "content": "blood pressure"}, {"role": "user", "content": "And HR?"},
                {"role": "assistant", "content": "heart rate"}]


def _same_example(tmp_path, name, rows, **cfg):
    path = tmp_path / name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif name.endswith(".arrow"):
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "tmp.parquet"))
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(tmp_path / "tmp.parquet")
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        _write(path, rows)
    data = load_splits(InstructionDataConfig(source=str(path), split=[1.0, 0.0, 0.0], **cfg))
    assert not data.skipped["train"], data.skipped["train"]
    return data.examples["train"]


@pytest.mark.parametrize("name, row", [
    ("alpaca.jsonl", {"instruction": "Expand the abbreviation.", "input": "BP", "output": "blood pressure"}),
    ("dolly.json", {"instruction": "Expand the abbreviation.", "context": "BP", "response": "blood pressure"}),
    ("alpaca.parquet", {"instruction": "Expand the abbreviation.", "input": "BP", "output": "blood pressure"}),
    ("dolly.arrow", {"instruction": "Expand the abbreviation.", "context": "BP", "response": "blood pressure"}),
])
def test_alpaca_and_dolly_rows_read_by_name_from_every_file_type(tmp_path, name, row):
    (ex,) = _same_example(tmp_path, name, [row])
    assert (ex.instruction, ex.context, ex.response) == ("Expand the abbreviation.", "BP", "blood pressure")
    assert ex.messages == [{"role": "user", "content": "Expand the abbreviation.\n\nBP"}]


def test_sharegpt_messages_and_prompt_completion_give_the_same_conversation(tmp_path):
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in CONVERSATION]}
    conversational = {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}
    found = [_same_example(tmp_path, f"{i}.jsonl", [row])[0]
             for i, row in enumerate([{"messages": CONVERSATION}, sharegpt, conversational])]
    for ex in found:
        assert ex.messages == CONVERSATION[:4] and ex.response == "heart rate"
    (plain,) = _same_example(tmp_path, "pc.jsonl", [{"prompt": "What is HR?", "completion": "heart rate"}])
    assert plain.messages == [{"role": "user", "content": "What is HR?"}] and plain.response == "heart rate"
    bad = _write(tmp_path / "bad.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}, {"text": "x"}])
    with pytest.raises(DataError, match="unknown speaker 'robot'.*no known fields"):
        load_splits(InstructionDataConfig(source=str(bad), split=[1.0, 0.0, 0.0]))


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_multi_turn_loss_covers_every_assistant_turn_or_the_last(tmp_path, tiny_llama, template):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok.chat_template = CHAT
    (ex,) = _same_example(tmp_path, "m.jsonl", [{"messages": CONVERSATION}])
    learnt = {}
    for train_on in ("all", "last"):
        ds = TokenizedDataset([ex], PromptFormatter(tok, template, train_on), 256, Skips())
        item = ds[0]
        assert len(item["labels"]) == len(item["input_ids"])
        learnt[train_on] = tok.decode([t for t in item["labels"] if t != -100], skip_special_tokens=True)
        assert all(lab in (-100, tid) for lab, tid in zip(item["labels"], item["input_ids"]))
    assert "heart rate" in learnt["last"] and "blood pressure" not in learnt["last"]
    assert "blood pressure" in learnt["all"] and "heart rate" in learnt["all"]
    for text in ("What is BP", "And HR", "Be brief"):  # user and system turns are never learnt
        assert text not in learnt["all"]


def test_a_template_that_rewrites_earlier_turns_is_named_with_the_fix(tiny_llama):
    from modaltune.text.data import Example

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|a|>[hidden]"
                         "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ex = Example("chat.jsonl:3", CONVERSATION[:4], "heart rate")
    with pytest.raises(DataError, match="chat.jsonl:3.*train_on=last"):
        PromptFormatter(tok, "chat", "all").encode(ex)
    assert PromptFormatter(tok, "chat", "last").encode(ex).labels[-1] == tok.eos_token_id


def test_packed_rows_train_exactly_as_the_examples_apart(tiny_llama, tiny_gemma, sft_data):
    """A packed row's loss is the token-weighted loss of its examples run one by one: each example attends only to
    itself (sdpa, block-diagonal mask from the position ids), and no loss crosses a boundary."""
    import torch

    from modaltune.shared.lm import CausalLMModel
    from modaltune.text.data import PackedCollator, PackedDataset
    from transformers import AutoModelForCausalLM

    for folder in (tiny_llama, tiny_gemma):  # gemma: sliding-window and full attention layers
        tok = AutoTokenizer.from_pretrained(str(folder))
        data = load_splits(InstructionDataConfig(source=str(sft_data), split=[1.0, 0.0, 0.0]))
        ds = TokenizedDataset(data.examples["train"][:9], PromptFormatter(tok, "plain"), 256, Skips())
        packed = PackedDataset(ds, 120)
        assert len(packed) < len(ds) and 0.5 < packed.fill <= 1.0
        assert sorted(len(r["input_ids"]) for r in packed.rows) and all(len(r["input_ids"]) <= 120 for r in packed)
        assert sum(len(r["input_ids"]) for r in packed) == sum(len(x["input_ids"]) for x in ds)
        torch.manual_seed(0)
        model = CausalLMModel(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)).eval()
        multi = [i for i, r in enumerate(packed.rows) if r["position_ids"].count(0) > 1]
        assert len(multi) >= 2  # rows holding several examples, padded to a common width below
        with torch.no_grad():
            batch = PackedCollator(tok.pad_token_id)([packed[multi[0]], packed[multi[1]]])
            assert "attention_mask" not in batch
            packed_loss = float(model(**batch)["loss"])
            total, count = 0.0, 0
            for row in multi[:2]:  # the same examples, one at a time
                start = 0
                for n in _example_lengths(packed[row]["position_ids"]):
                    ids = torch.tensor([packed[row]["input_ids"][start:start + n]])
                    labels = torch.tensor([packed[row]["labels"][start:start + n]])
                    k = int((labels[:, 1:] != -100).sum())
                    total += float(model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)["loss"]) * k
                    count += k
                    start += n
            assert packed_loss == pytest.approx(total / count, abs=1e-5)
            unmasked = dict(batch, position_ids=torch.arange(batch["input_ids"].size(1)).repeat(2, 1))
            assert float(model(**unmasked)["loss"]) != pytest.approx(packed_loss, abs=1e-3)  # boundaries matter


def _example_lengths(positions):
    lengths, n = [], 0
    for p in positions:
        if p == 0 and n:
            lengths.append(n)
            n = 0
        n += 1
    return lengths + [n]


def test_packing_with_virtual_tokens_is_refused():
    from modaltune.recipes.text_sft import TextSFTConfig
    from modaltune.shared.config import from_dict
    from modaltune.shared.errors import ConfigError

    with pytest.raises(ConfigError, match="packing.*prompt_tuning"):
        from_dict(TextSFTConfig, {"data": {"packing": True}, "llm": {"method": "prompt_tuning"}})
