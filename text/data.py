"""Instruction data in the formats people have: Dolly, Alpaca, ShareGPT, OpenAI ``messages`` and
prompt/completion rows, from JSONL/JSON/CSV/Parquet/Arrow files or any ``datasets`` dataset.

Records are normalised to an :class:`Example` (the conversation before the answer, the answer), formatted with the
model's chat template (or a plain ``### Instruction / ### Response`` template), tokenised with the loss on the
assistant's tokens only (every assistant turn of a conversation, or the last one) and length-filtered. Everything
dropped is counted with its reason, so the report says what was lost; a field of the wrong type (a list where text
belongs, an image part in a message) is such a reason, never trained on as its Python repr.
"""

from __future__ import annotations

import dataclasses
import math
from importlib import resources
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError, DataError
from modaltune.shared.io import read_hf_rows, read_rows, seeded_split
from modaltune.shared.skips import Skips
from modaltune.shared.loss import IGNORE_INDEX
from modaltune.shared.sequences import PromptTarget, encode_prompt_target, pad_batch

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class InstructionDataConfig:
    """Where instruction data comes from and how it is split and cut."""

    source: str = doc("builtin:clinical_sft",
                      "JSONL/JSON/CSV/Parquet/Arrow file, builtin:NAME, or hf:NAME[:CONFIG] (datasets)")
    validation: str | None = doc(None, "separate validation file/dataset (default: split from source)")
    test: str | None = doc(None, "separate test file/dataset (default: split from source)")
    format: Literal["auto", "dolly", "alpaca", "sharegpt", "messages", "prompt_completion"] = doc(
        "auto", "dolly: instruction/context/response; alpaca: instruction/input/output; sharegpt: conversations of "
        "from/value; messages: OpenAI role/content; prompt_completion: prompt/completion; auto: by the fields present")
    columns: dict[str, str] = doc({}, "map our field names (instruction, context, input, response, output, "
                                      "messages, conversations, prompt, completion, category) to your columns")
    train_on: Literal["all", "last"] = doc("all", "loss on every assistant turn of a conversation, or the last only")
    packing: bool = doc(False, "pack training examples into rows of max_length tokens (each example attends only "
                               "to itself); train.batch_size then counts rows")
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


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


def detect_format(row: dict[str, Any], columns: dict[str, str]) -> str | None:
    """The format a row is in, judged by the fields it has (after the column map)."""
    def has(field: str) -> bool:
        return row.get(columns.get(field, field)) is not None

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction") and has("output") and not has("response"):
        return "alpaca"
    if has("instruction"):
        return "dolly"
    if has("prompt") and has("completion"):
        return "prompt_completion"
    return None


class RowSkip(Exception):
    """A row that cannot be used; the message is the skip reason its reader counts it under."""


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def text_field(value: Any, name: str, expected: str = "a string", *, numbers: bool = False) -> str:
    """A text field's value; raises :class:`RowSkip` ("``name``: expected a string, got list") for anything but a
    string, or, with ``numbers``, a finite int or float (an answer such as ``42``, read as its decimal text).

    Lists, objects and booleans are never turned into text; numbers are refused where a question or instruction
    belongs: a CSV gives every cell as a string, so a typed number there comes from JSON, Parquet or a dataset and
    most likely marks a data error (a shifted column, a label id).
    """
    if isinstance(value, str):
        return value
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    raise RowSkip(f"{name}: expected {expected}, got {_type_name(value)}")


def content_text(value: Any, name: str = "content") -> str:
    """A message's content as text: a string, None (empty: a turn that only calls tools), or a list of OpenAI
    content parts whose ``text`` parts are concatenated in order with nothing between them, as OpenAI and the
    Hugging Face chat templates join them.

    Raises:
        RowSkip: a part of another type (``image_url``, ``input_audio``, ...), which a text-only recipe cannot
            train on, a malformed part, or content of another type.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RowSkip(f"{name}: expected a string or a list of content parts, got {_type_name(value)}")
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise RowSkip(f"{name}: expected content parts (objects with a type), got {_type_name(part)}")
        if kind != "text":
            raise RowSkip(f"{name}: part of type {kind!r} in a text-only recipe")
        texts.append(text_field(part.get("text"), f"{name}: text part"))
    return "".join(texts)


def _label(value: Any, name: str) -> str:
    """A label field (a category): text or an integer id, empty when absent."""
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return text_field(value, name, "a string or an integer")


def _turns(raw: Any, role_key: str, content_key: str, roles: dict[str, str] | None) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise RowSkip("no messages")
    turns = []
    for m in raw:
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise RowSkip(f"malformed message (needs {role_key} and {content_key})")
        role = text_field(m[role_key], role_key)
        if roles is not None:
            if role.lower() not in roles:
                raise RowSkip(f"unknown speaker {role!r} (expected one of {', '.join(sorted(roles))})")
            role = roles[role.lower()]
        turns.append({"role": role, "content": content_text(m[content_key], content_key)})
    return turns


def _conversation(rid: str, turns: list[dict[str, str]], category: str) -> Example:
    if turns[-1]["role"] != "assistant":
        raise RowSkip("last message is not from the assistant")
    if not turns[-1]["content"].strip():
        raise RowSkip("empty response")
    return Example(rid, turns[:-1], turns[-1]["content"].strip(), category)


def to_example(rid: str, row: dict[str, Any], fmt: str, columns: dict[str, str]) -> Example | str:
    """Normalise one row; returns a skip reason string when the row cannot be used.

    Every field's type is checked and a wrong one is a reason naming the field as the data names it (after the
    column map): "instruction: expected a string, got list". A message's content may be a list of OpenAI content
    parts (:func:`content_text`).
    """
    try:
        return _to_example(rid, row, fmt, columns)
    except RowSkip as skip:
        return str(skip)


def _to_example(rid: str, row: dict[str, Any], fmt: str, columns: dict[str, str]) -> Example:
    def name(field: str) -> str:
        return columns.get(field, field)

    def get(field: str) -> Any:
        return row.get(name(field))

    if fmt == "auto":
        fmt = detect_format(row, columns) or ""
        if not fmt:
            raise RowSkip("no known fields (messages, conversations, instruction+response/output, "
                          "prompt+completion); map yours with data.columns")
    category = _label(get("category"), name("category"))
    if fmt == "messages":
        return _conversation(rid, _turns(get("messages"), "role", "content", None), category)
    if fmt == "sharegpt":
        return _conversation(rid, _turns(get("conversations"), "from", "value", SHAREGPT_ROLES), category)
    if fmt == "prompt_completion":
        prompt, completion = get("prompt"), get("completion")
        if prompt is None or completion is None:
            raise RowSkip("missing prompt or completion field")
        either = "a string or a list of messages"
        turns = _turns(prompt, "role", "content", None) if isinstance(prompt, list) else [
            {"role": "user", "content": text_field(prompt, name("prompt"), either)}]
        if isinstance(completion, list):  # conversational form: the completion is the assistant's message(s)
            return _conversation(rid, turns + _turns(completion, "role", "content", None), category)
        return _conversation(rid, turns + [{"role": "assistant", "content": text_field(
            completion, name("completion"), "a string, a number or a list of messages", numbers=True)}], category)
    answer_field = "output" if fmt == "alpaca" else "response"
    context_field = "input" if fmt == "alpaca" else "context"
    instruction, response = get("instruction"), get(answer_field)
    if instruction is None or response is None:
        raise RowSkip(f"missing instruction or {answer_field} field")
    instruction = text_field(instruction, name("instruction")).strip()
    response = text_field(response, name(answer_field), "a string or a number", numbers=True).strip()  # 42 -> "42"
    if not instruction:
        raise RowSkip("empty instruction")
    if not response:
        raise RowSkip("empty response")
    context = get(context_field)
    context = "" if context is None else text_field(context, name(context_field)).strip()
    content = f"{instruction}\n\n{context}" if context else instruction
    return Example(rid, [{"role": "user", "content": content}], response, category, instruction, context)


def split_and_cap(to_item: Any, cfg: Any, caps: dict[str, int | None], what: str
                  ) -> tuple[dict[str, list], dict[str, Skips]]:
    """Train / validation / test items and what was skipped per split: every record of ``cfg.source`` (read with
    ``cfg.hf_split``) through ``to_item(id, row)``, which returns an item or a skip reason, split by ``cfg.split``
    with ``cfg.split_seed`` (or ``cfg.validation`` / ``cfg.test`` when given), each cut to its cap (counted).

    Raises:
        DataError: no usable training item (the skip reasons are named).
    """
    skipped: dict[str, Skips] = {s: Skips() for s in SPLITS}

    def convert(source: str, split: str) -> list:
        out = []
        for rid, row in read_records(source, hf_split=cfg.hf_split):
            item = to_item(rid, row)
            if isinstance(item, str):
                skipped[split].add(item, rid)
            else:
                out.append(item)
        return out

    main = convert(cfg.source, "train")
    if cfg.validation or cfg.test:
        items = {"train": main, "validation": convert(cfg.validation, "validation") if cfg.validation else [],
                 "test": convert(cfg.test, "test") if cfg.test else []}
    else:
        sizes = [round(cfg.split[0] * len(main)), round(cfg.split[1] * len(main))]
        items = dict(zip(SPLITS, seeded_split(main, sizes, cfg.split_seed)))
    if not items["train"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped["train"].items()) or "the source is empty"
        raise DataError(f"no usable training {what} in {cfg.source!r} ({reasons})")
    for split, cap in caps.items():
        if cap is not None and len(items[split]) > cap:
            name = f"max_{'train' if split == 'train' else 'eval'}_{what}={cap}"
            skipped[split].cap(name, len(items[split]) - cap)
            items[split] = items[split][:cap]
    return items, skipped


def load_splits(cfg: InstructionDataConfig) -> SplitData:
    """Read, normalise and split the data; malformed rows are counted per reason, not lost silently."""
    caps = {"train": cfg.max_train_examples, "validation": cfg.max_eval_examples, "test": cfg.max_eval_examples}
    examples, skipped = split_and_cap(lambda rid, row: to_example(rid, row, cfg.format, cfg.columns), cfg, caps,
                                      "examples")
    return SplitData(examples, skipped)


class PromptFormatter:
    """Renders an example's prompt and response with the chat template, or the plain template."""

    def __init__(self, tokenizer: Any, template: str = "auto", train_on: str = "all") -> None:
        self.tok = tokenizer
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ConfigError("model.template is 'chat' but this tokenizer has no chat template; use auto or plain")
        self.use_chat = has_chat if template == "auto" else template == "chat"
        self.train_on = train_on
        self.name = "chat template" if self.use_chat else "plain ### Instruction / ### Response template"

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation as text; with ``add_generation_prompt`` it ends where the assistant starts."""
        if self.use_chat:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
        return text + ("### Assistant:\n" if add_generation_prompt else "")

    def prompt(self, ex: Example) -> str:
        """The text the model sees before it answers."""
        if not self.use_chat and ex.instruction is not None:
            text = f"### Instruction:\n{ex.instruction}\n\n"
            if ex.context:
                text += f"### Input:\n{ex.context}\n\n"
            return text + "### Response:\n"
        return self.render(ex.messages, add_generation_prompt=True)

    def earlier_answers(self, ex: Example, prompt: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns inside ``prompt`` (a conversation's earlier answers).

        Raises:
            DataError: the template does not render a conversation as its turns one after another (some drop
                earlier turns' reasoning), so the spans cannot be found; ``data.train_on=last`` avoids the need.
        """
        spans = []
        for i, m in enumerate(ex.messages):
            if m["role"] != "assistant":
                continue
            start = self.render(ex.messages[:i], add_generation_prompt=True)
            end = self.render(ex.messages[: i + 1], add_generation_prompt=False)
            if not (end.startswith(start) and prompt.startswith(end)):
                raise DataError(f"{ex.id}: this chat template does not render the conversation turn by turn, so "
                                "earlier assistant turns cannot be trained; set data.train_on=last")
            spans.append((len(start), len(end)))
        return spans

    def encode(self, ex: Example, max_length: int | None = None) -> PromptTarget | None:
        """The example's prompt and response as one sequence (see
        :func:`~modaltune.shared.sequences.encode_prompt_target`): the prompt's labels are masked except for earlier
        assistant turns (with ``train_on="all"``); the response ends with the EOS token so the model learns to stop.
        None when longer than ``max_length`` tokens."""
        prompt = self.prompt(ex)
        special = not self.use_chat
        spans = self.earlier_answers(ex, prompt) if self.train_on == "all" else []
        if spans:
            enc = self.tok(prompt, add_special_tokens=special, return_offsets_mapping=True)
            prompt_ids = enc["input_ids"]
            prompt_labels = [tid if any(a <= s < b for a, b in spans) and e > s else IGNORE_INDEX
                             for tid, (s, e) in zip(prompt_ids, enc["offset_mapping"])]
        else:
            prompt_ids, prompt_labels = self.tok(prompt, add_special_tokens=special)["input_ids"], None
        return encode_prompt_target(self.tok, prompt_ids, ex.response, prompt_labels=prompt_labels,
                                    max_length=max_length)


def prompt_style(examples: list[Example]) -> str:
    """``instruction`` when every example is an instruction row (Dolly, Alpaca: the plain template's
    ``### Instruction / ### Response`` form), else ``conversation`` (``### User / ### Assistant`` turns)."""
    return "instruction" if examples and all(ex.instruction is not None for ex in examples) else "conversation"


def plain_chat_template(style: str, bos_token: str | None = None) -> str:
    """A Jinja chat template that renders chat messages exactly as the plain template rendered training prompts, so
    a merged model can be used with ``apply_chat_template`` or ``pipeline("text-generation")`` and chat messages.

    ``style`` is :func:`prompt_style` of the training data; ``bos_token`` is written first when the tokenizer put
    one before every training prompt.
    """
    if style == "instruction":
        heads = "{'user': '### Instruction:\\n', 'assistant': '### Response:\\n'}"
        reply = "### Response:\\n"
    else:
        heads = "{'user': '### User:\\n', 'assistant': '### Assistant:\\n'}"
        reply = "### Assistant:\\n"
    lead = "{{- bos_token -}}" if bos_token else ""
    return (lead + "{%- set heads = " + heads + " -%}"
            "{%- for m in messages -%}"
            "{{- heads.get(m['role'], '### ' + m['role'] | capitalize + ':\\n') + m['content'] + '\\n\\n' -}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '" + reply + "' -}}{%- endif -%}")


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised examples: ``input_ids`` with ``labels`` masked to the assistant's tokens."""

    def __init__(self, examples: list[Example], formatter: PromptFormatter, max_length: int, skipped: Skips):
        self.items: list[dict[str, Any]] = []
        self.examples: list[Example] = []
        for ex in examples:
            enc = formatter.encode(ex, max_length)
            if enc is None:
                skipped.add(f"longer than max_length={max_length} tokens", ex.id)
                continue
            self.items.append({"input_ids": enc.input_ids, "labels": enc.labels, "prompt_ids": enc.prompt_ids})
            self.examples.append(ex)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def subset(self, keep: Callable[[Example], bool]) -> TokenizedDataset:
        """The examples ``keep`` accepts (e.g. one category), sharing this set's tokenisation."""
        out = TokenizedDataset([], None, 0, Skips())
        for item, ex in zip(self.items, self.examples):
            if keep(ex):
                out.items.append(item)
                out.examples.append(ex)
        return out


class PadCollator:
    """Right-pads ``input_ids``/``labels`` to the longest item of the batch and builds the attention mask."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_batch([b["input_ids"] for b in batch], [b["labels"] for b in batch], pad_id=self.pad)


class PackedDataset(torch.utils.data.Dataset):
    """Tokenised examples packed into rows of at most ``length`` tokens (first-fit decreasing, whole examples only).

    Each row carries ``position_ids`` that restart at 0 for every example: with no attention mask, transformers turns
    that into a block-diagonal causal mask (sdpa, eager and flash attention alike), so an example never attends to
    its neighbours, and the loss never crosses a boundary (an example starts with a masked prompt token).
    """

    def __init__(self, dataset: TokenizedDataset, length: int) -> None:
        order = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))
        bins: list[list[int]] = []
        room: list[int] = []
        for i in order:
            n = len(dataset[i]["input_ids"])
            slot = next((b for b, free in enumerate(room) if free >= n), None)
            if slot is None:
                bins.append([]), room.append(length)
                slot = len(bins) - 1
            bins[slot].append(i)
            room[slot] -= n
        self.rows = []
        for members in bins:
            ids, labels, positions = [], [], []
            for i in sorted(members):  # dataset order inside a row
                item = dataset[i]
                ids += item["input_ids"]
                labels += item["labels"]
                positions += list(range(len(item["input_ids"])))
            self.rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
        self.examples = dataset.examples
        self.fill = sum(len(r["input_ids"]) for r in self.rows) / max(length * len(self.rows), 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


class PackedCollator(PadCollator):
    """Right-pads packed rows; the padding gets its own positions (a block of its own) and no labels. No attention
    mask: the positions mark the examples. An unpacked item (an evaluation example) is a row of one example."""

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = super().__call__(batch)
        width = out.pop("attention_mask").size(1)
        positions = torch.arange(width).repeat(len(batch), 1)  # (B, T)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            positions[i, :n] = torch.tensor(b["position_ids"]) if "position_ids" in b else torch.arange(n)
            positions[i, n:] = torch.arange(width - n)
        out["position_ids"] = positions
        return out


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
