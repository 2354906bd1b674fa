"""Data for composed models, any modality: prompts with one placeholder, the dataset, the collator, generation.

A prompt carries one placeholder string (``<ImageHere>``, ``<AudioHere>``); it is tokenised as a single pad token
whose position each example records, so :class:`~modaltune.shared.compose.ComposedLM` can splice the projected
encoder tokens there with no change to the LM's vocabulary. Rows name their input (an image path, a clip id)
under ``input``; a ``load`` function turns it into what the encoder's ``preprocess`` takes, and a
:class:`~modaltune.shared.features.FeatureCache` holds the frozen part's states when there is one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError, DataError, ModaltuneError
from modaltune.shared.features import FeatureCache, token_count
from modaltune.shared.generation import DecodingConfig, Inputs, generate
from modaltune.shared.loss import IGNORE_INDEX
from modaltune.shared.provenance import fingerprint
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
        readings: input -> ``(R, D)`` word tokens another reader gave it (:func:`heldout_readings`); the LLM is
            shown them in training instead of the model's own reading.
        readings_captions: caption rows (a transcript, a caption: the target describes the input) get ``readings``
            too; else only the other rows (questions, extraction) do.
    """

    def __init__(self, rows: list[dict[str, Any]], tokenizer, features: FeatureCache | None, *, placeholder: str,
                 max_length: int, skipped: Skips, readings: dict[Any, torch.Tensor] | None = None,
                 readings_captions: bool = True) -> None:
        self.rows, self.items = [], []
        for row in rows:
            ids, pos = encode_prompt(tokenizer, row["prompt"], placeholder)
            target = tokenizer(" " + row["target"].strip(), add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id]
            if len(ids) + len(target) > max_length:
                skipped.add(f"longer than max_length={max_length} tokens", row["id"])
                continue
            self.items.append({"input_ids": ids + target, "labels": [IGNORE_INDEX] * len(ids) + target,
                               "prompt_ids": ids, "placeholder_position": pos, "input": row["input"],
                               "caption": row.get("type") == "caption"})
            self.rows.append(row)
        self.features = features
        self.readings = readings
        self.readings_captions = readings_captions
        if readings is not None and (missing := [it["input"] for it in self.items if self._reads(it)
                                                 and it["input"] not in readings]):
            raise DataError(f"no held-out reading of {len(missing)} inputs, e.g. {missing[0]!r}")

    def fingerprint(self) -> str:
        """The training content: every row's tokens and its input's content key (not the cached encoder states)."""
        key = self.features.key if self.features is not None else (lambda x: x)
        return fingerprint([(it["input_ids"], it["labels"], key(it["input"]), it["caption"]) for it in self.items])

    def _reads(self, item: dict[str, Any]) -> bool:
        return self.readings is not None and (self.readings_captions or not item["caption"])

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
        width = max(len(b[key]) for b in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        pos = torch.zeros(len(batch), dtype=torch.long)  # (B,)
        for i, b in enumerate(batch):
            n = len(b[key])
            off = width - n if self.left else 0
            ids[i, off : off + n] = torch.tensor(b[key])
            mask[i, off : off + n] = 1
            if not self.prompt_only:
                labels[i, off : off + n] = torch.tensor(b["labels"])
            pos[i] = b["placeholder_position"] + off
        out = {"input_ids": ids, "attention_mask": mask, "placeholder_positions": pos}
        if not self.prompt_only:
            out["labels"] = labels
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
    :class:`~modaltune.shared.compose.ComposedLM`)."""

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


@dataclasses.dataclass
class HeldoutConfig:
    """Cross-fitting: the LLM learns from readings of inputs their reader was not trained on."""

    folds: int = doc(0, "split the training inputs into this many folds; each fold's inputs are read by a reader "
                        "(the word projector) trained, by its grounding loss alone, on the other folds, and the "
                        "LLM is shown those readings in training (0: off; the LLM sees the model's own reader, "
                        "near-perfect on the clips it learned from and not on held-out ones)")
    stages: list[str] | None = doc(None, "stages whose LLM is shown held-out readings (null: every stage that "
                                         "trains the LLM)")
    captions: bool = doc(False, "also on rows whose target is the input's own transcript or caption (audio-llm, "
                                "seed 42: test WER 0.877 against 0.721 without: shown misread speech with the right "
                                "transcript as the answer, the LLM learnt to write fluent text of its own where the "
                                "reading is unsure); off: only the other tasks' rows (extraction, questions)")
    steps: int | None = doc(None, "each fold reader's optimizer steps (null: the first loss: grounding stage's, "
                                  "scaled by the share of inputs a reader trains on, so it sees as many epochs)")
    lr: float | None = doc(None, "its learning rate (null: as that stage trains the projector)")

    def validate(self, where: str) -> None:
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"{where}.folds must be 0 (off) or at least 2, got {self.folds}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"{where}.steps must be at least 1 (or null)")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"{where}.lr must be positive (or null)")


def check_heldout(cfg: HeldoutConfig, stages: list[Any], projector: Any, train: Any) -> tuple[list[str], int, float]:
    """A held-out config checked against the run's stages, projector and ``train`` config (``lr``, ``max_steps``):
    the stages whose LLM is shown held-out readings (none when off), and each fold reader's steps and learning rate
    (by default as the first stage with ``loss: grounding`` trains the projector, its steps scaled by the share of
    the inputs a reader trains on)."""
    if not cfg.folds:
        return [], 0, 0.0
    if not (projector.collapse and projector.norm == "words"):
        raise ConfigError("heldout.folds needs a reading to hold out: projector.norm: words, grounding: ctc and "
                          "collapse: true (or set heldout.folds: 0)")
    names = [s.name for s in stages]
    if cfg.stages is None:
        used = [s.name for s in stages if s.loss == "model" and (s.components is None or "llm" in s.components)]
    else:
        used = list(cfg.stages)
    for name in used:
        stage = next((s for s in stages if s.name == name), None)
        if stage is None:
            raise ConfigError(f"heldout.stages names {name!r}, which is not a stage ({', '.join(names)})")
        if stage.loss != "model":
            raise ConfigError(f"heldout.stages: stage {name!r} has loss: {stage.loss}; held-out readings are for "
                              "stages that train the LLM")
    grounding = next((s for s in stages if s.loss == "grounding"), None)
    base = (train.max_steps if grounding.max_steps is None else grounding.max_steps) if grounding else None
    steps = cfg.steps or (max(1, round(base * (cfg.folds - 1) / cfg.folds)) if base and base > 0 else None)
    lr = cfg.lr or projector.lr or (grounding.lr if grounding else None) or train.lr
    if used and steps is None:
        raise ConfigError("heldout.steps is needed: no stage with loss: grounding and max_steps to take it from")
    return used, steps or 0, lr


def heldout_readings(model, data: ComposedDataset, inputs: list[Any], *, folds: int, steps: int, lr: float,
                     batch_size: int, seed: int, precision: str = "fp32", max_grad_norm: float = 1.0,
                     log: Callable[[str], None] = print) -> dict[Any, torch.Tensor]:
    """Cross-fitted readings: input -> the ``(R, D)`` word tokens (what the LLM is shown) a reader gave it that
    never trained on it.

    ``inputs`` are dealt into ``folds`` at random (``seed``); for each fold the word projector, from its present
    weights, trains ``steps`` AdamW steps (cosine, 5% warm-up) on the grounding loss of ``data``'s grounding rows
    whose input is in another fold, then reads the fold's inputs. The projector's weights and trainability come
    back as they were. Trained on its own clips, a reader spells them almost perfectly, so an LLM shown those
    readings learns to copy them; shown held-out ones it learns the errors it meets on new speech.
    """
    import random

    from modaltune.shared.compose import read_tokens, word_projector
    from modaltune.shared.training import autocast

    words = word_projector(model.projector)
    if words is None or not words.collapse or data.features is None or not data.features.complete:
        raise ConfigError("held-out readings need a collapsing word projector and a feature cache of the encoder's "
                          "output (a frozen encoder)")
    order = sorted(dict.fromkeys(inputs), key=str)
    random.Random(seed).shuffle(order)
    fold_of = {x: i % folds for i, x in enumerate(order)}
    params = list(model.projector.parameters())
    saved = {k: v.detach().clone() for k, v in model.projector.state_dict().items()}
    trainable, was_training = [p.requires_grad for p in params], model.training
    collate = ComposedCollator(0)
    device = params[0].device
    out: dict[Any, torch.Tensor] = {}
    try:
        for fold in range(folds):
            model.projector.load_state_dict(saved)
            for p in params:
                p.requires_grad_(True)
            pool = [i for i, item in enumerate(data.items) if item["caption"] and fold_of.get(item["input"]) != fold]
            if not pool:
                raise DataError(f"held-out fold {fold + 1}/{folds} leaves no transcription rows to train its reader")
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            warm = max(1, round(0.05 * steps))  # the measured figures come from this schedule (transformers'
            # cosine-with-warmup starts its warm-up at 0, not at lr/warm, and would move them)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
                1.0 + math.cos(math.pi * min(1.0, max(0, s + 1 - warm) / max(1, steps - warm)))))
            rng = random.Random(f"{seed}:{fold}")
            model.train()
            total = 0.0
            for _ in tqdm(range(steps), desc=f"held-out reader {fold + 1}/{folds}", leave=False):
                batch = to_device(collate([data[i] for i in rng.sample(pool, min(batch_size, len(pool)))]), device)
                with autocast(precision, device):
                    loss = model(**batch, objective="grounding")["loss"]
                loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                total += loss.item()
            mine = [x for x in order if fold_of[x] == fold]
            with autocast(precision, device):
                out.update(zip(mine, read_tokens(model, [data.features.get(x) for x in mine])))
            log(f"held-out reader {fold + 1}/{folds}: {len(pool)} rows, {steps} steps, mean loss "
                f"{total / steps:.3f}; read {len(mine)} inputs")
    finally:
        model.projector.load_state_dict(saved)
        for p, t in zip(params, trainable):
            p.requires_grad_(t)
        model.train(was_training)
    return out
