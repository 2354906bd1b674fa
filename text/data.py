"""Instruction data: JSONL/JSON/CSV files with Dolly fields or chat ``messages``, or any ``datasets`` dataset.

Records are normalised to ``{"id", "prompt_parts", "response", "category"}``, formatted with the model's chat
template (or a plain ``### Instruction / ### Response`` template), tokenised with the loss on response tokens only,
and length-filtered. Everything dropped is counted with its reason, so the report says what was lost.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError, DataError
from modaltune.shared.io import read_hf_rows, read_rows, seeded_split
from modaltune.shared.skips import Skips
from modaltune.shared.loss import IGNORE_INDEX

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class InstructionDataConfig:
    """Where instruction data comes from and how it is split and cut."""

    source: str = doc("builtin:clinical_sft", "JSONL/JSON/CSV file, builtin:NAME, or hf:NAME[:CONFIG] (datasets)")
    validation: str | None = doc(None, "separate validation file/dataset (default: split from source)")
    test: str | None = doc(None, "separate test file/dataset (default: split from source)")
    format: Literal["auto", "dolly", "messages"] = doc("auto", "dolly: instruction/context/response; messages: chat")
    columns: dict[str, str] = doc({}, "map our fields (instruction, context, response, category, messages) to yours")
    hf_split: str = doc("train", "split to read from a datasets dataset")
    split: list[float] = doc([0.8, 0.1, 0.1], "train/validation/test fractions when the data has no split")
    split_seed: int = doc(42, "seed of the train/validation/test shuffle")
    max_length: int = doc(256, "examples longer than this many tokens are dropped (and counted)")
    max_train_examples: int | None = doc(None, "use at most this many training examples")
    max_eval_examples: int | None = doc(None, "use at most this many validation and test examples each")

    def validate(self, where: str) -> None:
        if len(self.split) != 3 or any(x < 0 for x in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ConfigError(f"{where}.split must be three non-negative fractions summing to 1, got {self.split}")
        if self.max_length < 8:
            raise ConfigError(f"{where}.max_length must be at least 8")


@dataclasses.dataclass
class Example:
    """One instruction example, format-independent."""

    id: str
    messages: list[dict[str, str]]  # the conversation up to (not including) the response
    response: str
    category: str = ""
    instruction: str | None = None  # Dolly-style rows keep their fields for the plain template
    context: str = ""


@dataclasses.dataclass
class SplitData:
    """Examples of every split plus what was skipped and why."""

    examples: dict[str, list[Example]]
    skipped: dict[str, Skips]


def builtin_path(name: str) -> Path:
    """The path of a data set shipped in ``modaltune.text/data``."""
    path = Path(str(resources.files("modaltune.text").joinpath("data", f"{name}.jsonl")))
    if not path.is_file():
        known = sorted(p.stem for p in Path(str(resources.files("modaltune.text").joinpath("data"))).glob("*.jsonl"))
        raise DataError(f"no built-in data set {name!r}; known: {', '.join(known)}")
    return path


def read_records(source: str, *, hf_split: str = "train") -> list[tuple[str, dict[str, Any]]]:
    """Raw records as ``(id, row)`` pairs; ids are ``file:line`` so errors and reports can point at the item."""
    if source.startswith("builtin:"):
        return read_records(str(builtin_path(source.split(":", 1)[1])))
    if source.startswith("hf:"):
        return read_hf_rows(source[3:], hf_split)
    rows = read_rows(source)
    for rid, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{rid}: expected a JSON object, got {type(row).__name__}")
    return rows


def to_example(rid: str, row: dict[str, Any], fmt: str, columns: dict[str, str]) -> Example | str:
    """Normalise one row; returns a skip reason string when the row cannot be used."""

    def get(field: str) -> Any:
        return row.get(columns.get(field, field))

    messages = get("messages")
    if fmt == "messages" or (fmt == "auto" and messages is not None):
        if not isinstance(messages, list) or not messages:
            return "no messages"
        turns = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return "malformed message (needs role and content)"
            turns.append({"role": str(m["role"]), "content": str(m["content"])})
        if turns[-1]["role"] != "assistant":
            return "last message is not from the assistant"
        if not turns[-1]["content"].strip():
            return "empty response"
        return Example(rid, turns[:-1], turns[-1]["content"].strip(), str(get("category") or ""))
    instruction, response = get("instruction"), get("response")
    if instruction is None or response is None:
        return "missing instruction or response field"
    instruction, response = str(instruction).strip(), str(response).strip()
    if not instruction:
        return "empty instruction"
    if not response:
        return "empty response"
    context = str(get("context") or "").strip()
    content = f"{instruction}\n\n{context}" if context else instruction
    return Example(rid, [{"role": "user", "content": content}], response, str(get("category") or ""), instruction, context)


def load_splits(cfg: InstructionDataConfig) -> SplitData:
    """Read, normalise and split the data; malformed rows are counted per reason, not lost silently."""
    skipped: dict[str, Skips] = {s: Skips() for s in SPLITS}

    def convert(source: str, split: str) -> list[Example]:
        out = []
        for rid, row in read_records(source, hf_split=cfg.hf_split):
            ex = to_example(rid, row, cfg.format, cfg.columns)
            if isinstance(ex, str):
                skipped[split].add(ex, rid)
            else:
                out.append(ex)
        return out

    main = convert(cfg.source, "train")
    if cfg.validation or cfg.test:
        examples = {
            "train": main,
            "validation": convert(cfg.validation, "validation") if cfg.validation else [],
            "test": convert(cfg.test, "test") if cfg.test else [],
        }
    else:
        sizes = [round(cfg.split[0] * len(main)), round(cfg.split[1] * len(main))]
        examples = dict(zip(SPLITS, seeded_split(main, sizes, cfg.split_seed)))
    if not examples["train"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped["train"].items()) or "the source is empty"
        raise DataError(f"no usable training examples in {cfg.source!r} ({reasons})")
    caps = {"train": cfg.max_train_examples, "validation": cfg.max_eval_examples, "test": cfg.max_eval_examples}
    for split, cap in caps.items():
        if cap is not None and len(examples[split]) > cap:
            skipped[split].cap(f"max_{'train' if split == 'train' else 'eval'}_examples={cap}",
                               len(examples[split]) - cap)
            examples[split] = examples[split][:cap]
    return SplitData(examples, skipped)


class PromptFormatter:
    """Renders an example's prompt and response with the chat template, or the plain template."""

    def __init__(self, tokenizer: Any, template: str = "auto") -> None:
        self.tok = tokenizer
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ConfigError("model.template is 'chat' but this tokenizer has no chat template; use auto or plain")
        self.use_chat = has_chat if template == "auto" else template == "chat"
        self.name = "chat template" if self.use_chat else "plain ### Instruction / ### Response template"

    def prompt(self, ex: Example) -> str:
        """The text the model sees before it answers."""
        if self.use_chat:
            return self.tok.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)
        if ex.instruction is not None:
            text = f"### Instruction:\n{ex.instruction}\n\n"
            if ex.context:
                text += f"### Input:\n{ex.context}\n\n"
            return text + "### Response:\n"
        text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in ex.messages)
        return text + "### Assistant:\n"

    def encode(self, ex: Example) -> tuple[list[int], list[int]]:
        """``(prompt_ids, response_ids)``; the response ends with the EOS token so the model learns to stop."""
        prompt_ids = self.tok(self.prompt(ex), add_special_tokens=not self.use_chat)["input_ids"]
        response_ids = self.tok(ex.response, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return prompt_ids, response_ids


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised examples: ``input_ids`` with ``labels`` masked to the response."""

    def __init__(self, examples: list[Example], formatter: PromptFormatter, max_length: int, skipped: Skips):
        self.items: list[dict[str, Any]] = []
        self.examples: list[Example] = []
        for ex in examples:
            prompt_ids, response_ids = formatter.encode(ex)
            ids = prompt_ids + response_ids
            if len(ids) > max_length:
                skipped.add(f"longer than max_length={max_length} tokens", ex.id)
                continue
            labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
            self.items.append({"input_ids": ids, "labels": labels, "prompt_ids": prompt_ids})
            self.examples.append(ex)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class PadCollator:
    """Right-pads ``input_ids``/``labels`` to the longest item of the batch and builds the attention mask."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)  # (B, T)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tokenized_splits(cfg: InstructionDataConfig, formatter: PromptFormatter
                     ) -> tuple[dict[str, TokenizedDataset], dict[str, dict]]:
    """The train / validation / test splits tokenised with ``formatter``, and their data counts for the report.

    Raises:
        DataError: every training example was dropped (the reasons are named).
    """
    splits = load_splits(cfg)
    sets = {name: TokenizedDataset(examples, formatter, cfg.max_length, splits.skipped[name])
            for name, examples in splits.examples.items()}
    counts = {name: splits.skipped[name].summary(len(sets[name])) for name in sets}
    if len(sets["train"]) == 0:
        raise DataError(f"every training example was dropped: {counts['train']['skip_reasons']}")
    return sets, counts
