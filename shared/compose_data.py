"""Data for composed models, any modality: prompts with one placeholder, the dataset, the collator, generation.

A prompt carries one placeholder string (``<ImageHere>``, ``<AudioHere>``); it is tokenised as a single pad token
whose position each example records, so :class:`~modaltune.shared.compose.core.ComposedLM` can splice the projected
encoder tokens there with no change to the LM's vocabulary. Rows name their input (an image path, a clip id)
under ``input``; a ``load`` function turns it into what the encoder's ``preprocess`` takes, and a
:class:`~modaltune.shared.features.FeatureCache` holds the frozen part's states when there is one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from modaltune.shared.errors import DataError, ModaltuneError
from modaltune.shared.features import FeatureCache, token_count
from modaltune.shared.generation import DecodingConfig, Inputs, generate
from modaltune.shared.provenance import fingerprint
from modaltune.shared.sequences import encode_prompt_target, pad_batch
from modaltune.shared.skips import Skips


def encode_prompt(tokenizer, text: str, placeholder: str) -> tuple[list[int], int]:
    """Token ids of a prompt with its placeholder as one pad token, and that token's position."""
    if text.count(placeholder) != 1:
        raise DataError(f"a prompt needs exactly one {placeholder}: {text[:80]!r}")
    before, after = text.split(placeholder)
    head = tokenizer(before, add_special_tokens=True)["input_ids"]
    tail = tokenizer(after, add_special_tokens=False)["input_ids"]
    return head + [tokenizer.pad_token_id] + tail, len(head)


class ComposedDataset(torch.utils.data.Dataset):
    """``(input, prompt, target)`` rows tokenised with the loss on the target only.

    Args:
        rows: dicts with ``id``, ``input``, ``prompt`` (holding ``placeholder`` once) and ``target``; a row whose
            ``type`` is ``caption`` describes its input (``projector.word_grounding`` uses it).
        tokenizer: the LLM's tokenizer.
        features: the cache holding every row's input (None: the collator runs the encoder).
        placeholder: the placeholder string in the prompts.
        max_length: longer rows (encoder tokens excluded) are skipped and counted in ``skipped``.
        readings: input -> ``(R, D)`` word tokens another reader gave it
            (:func:`~modaltune.shared.compose.heldout.heldout_readings`); on the rows whose target does not describe
            their input (questions, extraction; not captions or transcripts) the LLM is shown them in training
            instead of the model's own reading.
    """

    def __init__(self, rows: list[dict[str, Any]], tokenizer, features: FeatureCache | None, *, placeholder: str,
                 max_length: int, skipped: Skips, readings: dict[Any, torch.Tensor] | None = None) -> None:
        self.rows, self.items = [], []
        for row in rows:
            ids, pos = encode_prompt(tokenizer, row["prompt"], placeholder)
            enc = encode_prompt_target(tokenizer, ids, " " + row["target"].strip(), max_length=max_length)
            if enc is None:
                skipped.add(f"longer than max_length={max_length} tokens", row["id"])
                continue
            self.items.append({"input_ids": enc.input_ids, "labels": enc.labels,
                               "prompt_ids": ids, "placeholder_position": pos, "input": row["input"],
                               "caption": row.get("type") == "caption"})
            self.rows.append(row)
        self.features = features
        self.readings = readings
        if readings is not None and (missing := [it["input"] for it in self.items if self._reads(it)
                                                 and it["input"] not in readings]):
            raise DataError(f"no held-out reading of {len(missing)} inputs, e.g. {missing[0]!r}")

    def fingerprint(self) -> str:
        """The training content: every row's tokens and its input's content key (not the cached encoder states)."""
        key = self.features.key if self.features is not None else (lambda x: x)
        return fingerprint([(it["input_ids"], it["labels"], key(it["input"]), it["caption"]) for it in self.items])

    def _reads(self, item: dict[str, Any]) -> bool:
        return self.readings is not None and not item["caption"]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.items[i])
        if self.features is not None:
            item["features"] = self.features.get(item["input"])
            if not self.features.complete:
                item["features_depth"] = self.features.depth
        if self._reads(item):
            item["reading"] = self.readings[item["input"]]
        return item


class ComposedCollator:
    """Pads a batch (right for training, left for generation) and shifts placeholder positions accordingly.

    Without cached ``features`` it loads each row's input with ``load`` and runs ``encoder.preprocess``.
    """

    def __init__(self, pad_id: int, encoder=None, *, load: Callable[[Any], Any] | None = None, left: bool = False,
                 prompt_only: bool = False) -> None:
        self.pad = pad_id
        self.encoder = encoder
        self.load = load
        self.left = left
        self.prompt_only = prompt_only

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        key = "prompt_ids" if self.prompt_only else "input_ids"
        out = pad_batch([b[key] for b in batch], None if self.prompt_only else [b["labels"] for b in batch],
                        pad_id=self.pad, left=self.left)
        width = out["input_ids"].size(1)
        out["placeholder_positions"] = torch.tensor(  # (B,)
            [b["placeholder_position"] + (width - len(b[key]) if self.left else 0) for b in batch], dtype=torch.long)
        if not self.prompt_only:
            if any(b.get("caption") for b in batch):  # targets that describe the input (projector.word_grounding)
                out["ground_words"] = torch.tensor([bool(b.get("caption")) for b in batch])
        if "features" in batch[0]:
            feats = [b["features"] for b in batch]
            lengths = [f.size(0) for f in feats]
            if len(set(lengths)) == 1:
                out["features"] = torch.stack(feats)  # (B, N, D)
            else:  # clips of different lengths: zero-padded, with each row's real length
                out["features"] = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
                out["features_lengths"] = torch.tensor(lengths)
            if "features_depth" in batch[0]:
                out["features_depth"] = batch[0]["features_depth"]
        else:
            if self.encoder is None:
                raise DataError("these rows have no cached features: give the collator the encoder (and load)")
            inputs = [self.load(b["input"]) if self.load else b["input"] for b in batch]
            out["encoder_inputs"] = self.encoder.preprocess(inputs)
            counts = [token_count(self.encoder, x) for x in inputs]
            if counts[0] is not None:
                out["features_lengths"] = torch.tensor(counts)
        if any("reading" in b for b in batch):  # held-out readings: padded word tokens, how many of each row's are
            # real, and which rows have one (the others are shown the model's own reading)
            given = [b.get("reading") for b in batch]
            blank = torch.zeros(1, next(r for r in given if r is not None).size(1))
            out["readings"] = torch.nn.utils.rnn.pad_sequence([r if r is not None else blank for r in given],
                                                              batch_first=True)
            out["readings_lengths"] = torch.tensor([r.size(0) if r is not None else 1 for r in given])
            if None in given:
                out["readings_rows"] = torch.tensor([r is not None for r in given])
        return out


class ObjectiveCollator:
    """A collator whose batches also name the loss the model computes (``objective``, e.g. ``grounding``: see
    :class:`~modaltune.shared.compose.core.ComposedLM`)."""

    def __init__(self, collator: Callable, objective: str) -> None:
        self.collator = collator
        self.objective = objective

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.collator(batch), "objective": self.objective}


def stage_collator(loss: str, collator: Callable) -> Callable | None:
    """The collator of a stage whose ``loss`` is not the model's own (None: the run's collator)."""
    return None if loss == "model" else ObjectiveCollator(collator, loss)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a batch on ``device``; other values as they are."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class ComposedPrompts(Inputs):
    """The prompts of a :class:`ComposedDataset` for :func:`~modaltune.shared.generation.generate`: left-padded
    (the answer follows each prompt's last token) in dataset order; ``encoder`` and ``load`` as for
    :class:`ComposedCollator` (rows without cached features)."""

    def __init__(self, dataset: ComposedDataset, tokenizer, *, encoder=None,
                 load: Callable[[Any], Any] | None = None) -> None:
        self.items = dataset
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.collate = ComposedCollator(tokenizer.pad_token_id, encoder, load=load, left=True, prompt_only=True)

    @contextlib.contextmanager
    def batch(self, indices: list[int], device: torch.device) -> Iterator[dict[str, Any]]:
        yield to_device(self.collate([self.items[i] for i in indices]), device)


def generate_about(model, tokenizer, item: Any, prompts: list[str], cfg: DecodingConfig, *, template: str,
                   placeholder: str, load: Callable[[Any], Any], max_length: int, precision: str) -> list[str]:
    """The composed model's answer to each prompt about one input ``item`` (an image or clip path; ``load`` reads
    it), each prompt put into ``template`` (``{instruction}`` or ``{question}``) as in training, decoded as the
    recipe's evaluation decodes (``cfg``).

    Raises:
        ModaltuneError: a prompt is longer than ``max_length`` tokens.
    """
    if not prompts:
        raise ModaltuneError("give one or more prompts: the questions or instructions about the input")
    rows = [{"id": f"prompt{i}", "input": item, "prompt": template.format(instruction=p, question=p), "target": ""}
            for i, p in enumerate(prompts)]
    skipped = Skips()
    data = ComposedDataset(rows, tokenizer, None, placeholder=placeholder, max_length=max_length, skipped=skipped)
    if skipped:
        raise ModaltuneError(f"a prompt is longer than max_length={max_length} tokens; shorten it or raise the "
                             "recipe's max_length with --set")
    return generate(model, tokenizer, ComposedPrompts(data, tokenizer, encoder=model.encoder, load=load), cfg,
                    precision=precision, desc="answering")

