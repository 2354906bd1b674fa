"""Held-out readings (cross-fitting): the LLM learns from readings of inputs their reader was not trained on.

A word reader (a collapsing word projector, :mod:`~modaltune.shared.compose.words`) spells the clips it trained on
almost perfectly, so an LLM shown those readings learns to copy them; shown readings of clips their reader never
heard, it learns the errors it meets on new speech. :func:`heldout_readings` trains one reader per fold, from the
projector's present weights, and hands the readings to the datasets of the stages :class:`HeldoutConfig` names
(:class:`~modaltune.shared.compose.core.Readings` carries them into the model).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from modaltune.shared.compose.reading import read_tokens
from modaltune.shared.compose.words import word_projector
from modaltune.shared.compose_data import ComposedCollator, ComposedDataset, to_device
from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError, DataError
from modaltune.shared.training import autocast


@dataclasses.dataclass
class HeldoutConfig:
    """Cross-fitting: the LLM learns from readings of inputs their reader was not trained on.

    The readings stand in for the model's own on the rows of the other tasks (extraction, questions), never on
    rows whose target is the input's own transcript or caption (shown misread speech with the right transcript
    as the answer, the LLM learnt to write fluent text of its own where the reading is unsure: audio-llm, seed
    42, test WER 0.877 against 0.721).
    """

    folds: int = doc(0, "split the training inputs into this many folds; each fold's inputs are read by a reader "
                        "(the word projector) trained, by its grounding loss alone, on the other folds, and the "
                        "LLM is shown those readings in training (0: off; the LLM sees the model's own reader, "
                        "near-perfect on the clips it learned from and not on held-out ones)")
    stages: list[str] | None = doc(None, "stages whose LLM is shown held-out readings (null: every stage that "
                                         "trains the LLM)")
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


def reader_schedule(step: int, steps: int) -> float:
    """A fold reader's learning-rate factor at optimizer ``step`` of ``steps``: linear warm-up over the first 5%
    of the steps, then cosine to 0; transformers' cosine schedule with warm-up one step ahead, so the first step
    already trains at ``lr / warm-up steps`` (transformers' starts at 0). The measured audio-llm figures come from
    this schedule.

    Example:
        >>> [round(reader_schedule(s, 40), 3) for s in (0, 1, 20, 39)]
        [0.5, 1.0, 0.5, 0.0]
    """
    warm = max(1, round(0.05 * steps))
    return min(1.0, (step + 1) / warm) * 0.5 * (
        1.0 + math.cos(math.pi * min(1.0, max(0, step + 1 - warm) / max(1, steps - warm))))


def heldout_readings(model, data: ComposedDataset, inputs: list[Any], *, folds: int, steps: int, lr: float,
                     batch_size: int, seed: int, precision: str = "fp32", max_grad_norm: float = 1.0,
                     log: Callable[[str], None] = print) -> dict[Any, torch.Tensor]:
    """Cross-fitted readings: input -> the ``(R, D)`` word tokens (what the LLM is shown) a reader gave it that
    never trained on it.

    ``inputs`` are dealt into ``folds`` at random (``seed``); for each fold the word projector, from its present
    weights, trains ``steps`` AdamW steps (:func:`reader_schedule`) on the grounding loss of ``data``'s grounding
    rows whose input is in another fold, then reads the fold's inputs. The projector's weights and trainability
    come back as they were.
    """
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
    out: dict[Any, torch.Tensor] = {}
    try:
        for fold in range(folds):
            model.projector.load_state_dict(saved)
            for p in params:
                p.requires_grad_(True)
            pool = [i for i, item in enumerate(data.items) if item["caption"] and fold_of.get(item["input"]) != fold]
            if not pool:
                raise DataError(f"held-out fold {fold + 1}/{folds} leaves no transcription rows to train its reader")
            total = _train_reader(model, data, pool, params, steps=steps, lr=lr, batch_size=batch_size,
                                  rng=random.Random(f"{seed}:{fold}"), precision=precision,
                                  max_grad_norm=max_grad_norm, desc=f"held-out reader {fold + 1}/{folds}")
            mine = [x for x in order if fold_of[x] == fold]
            with autocast(precision, params[0].device):
                out.update(zip(mine, read_tokens(model, [data.features.get(x) for x in mine])))
            log(f"held-out reader {fold + 1}/{folds}: {len(pool)} rows, {steps} steps, mean loss "
                f"{total / steps:.3f}; read {len(mine)} inputs")
    finally:
        model.projector.load_state_dict(saved)
        for p, t in zip(params, trainable):
            p.requires_grad_(t)
        model.train(was_training)
    return out


def _train_reader(model, data: ComposedDataset, pool: list[int], params: list[torch.nn.Parameter], *, steps: int,
                  lr: float, batch_size: int, rng: random.Random, precision: str, max_grad_norm: float,
                  desc: str) -> float:
    """Train the projector ``steps`` steps on the grounding loss of batches drawn from ``pool``; the summed loss."""
    collate = ComposedCollator(0)
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: reader_schedule(s, steps))
    model.train()
    total = 0.0
    for _ in tqdm(range(steps), desc=desc, leave=False):
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
    return total
