"""One way to generate: the decoding settings every recipe shares, and the loop that decodes with them.

:class:`DecodingConfig` holds what a decode needs (beams, batch size, answer length, the no-repeat n-gram size);
each recipe's evaluation section inherits it and sets its own defaults. :func:`generate` decodes any model whose
class has transformers' ``generate``, a causal LM, a composed model or Whisper, from an :class:`Inputs`: the
object that knows how that model's inputs are batched (:class:`TokenPrompts` here for causal LMs,
:class:`~modaltune.shared.compose_data.ComposedPrompts` for composed models,
:class:`~modaltune.audio.eval.WhisperClips` for Whisper). :func:`generate` batches, passes the attention mask and
one ``GenerationConfig`` as transformers expects them, decodes, and runs under the training precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError
from modaltune.shared.training import autocast


@dataclasses.dataclass
class DecodingConfig:
    """How answers are decoded (greedy or beam search, batched); evaluation sections inherit it."""

    max_new_tokens: int = doc(48, "longest generated answer, in tokens")
    num_beams: int = doc(1, "1: greedy decoding; more: beam search (each beam costs about one more greedy pass)")
    batch_size: int = doc(8, "prompts (or clips) per generation batch")
    no_repeat_ngram: int = doc(0, "above 0: no n-gram of this size twice in a generated sequence (stops greedy "
                                  "loops; a causal LM's sequence includes its prompt); 0: off")

    def validate(self, where: str) -> None:
        if self.num_beams < 1:
            raise ConfigError(f"{where}.num_beams must be 1 (greedy) or more (beam search)")
        if self.no_repeat_ngram < 0:
            raise ConfigError(f"{where}.no_repeat_ngram must be 0 (off) or a positive n-gram size")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"{where}.batch_size and {where}.max_new_tokens must be at least 1")

    def generation_config(self, *, pad_token_id: int | None = None,
                          eos_token_id: int | list[int] | None = None) -> GenerationConfig:
        """The ``GenerationConfig`` of these settings: deterministic (no sampling); special tokens left unset fall
        back to the model's own generation config.

        The sampling-only settings are set to the values that change nothing (transformers' defaults): left unset,
        ``generate`` would fill them from the model's own config (an instruct model ships ``temperature``, ``top_p``,
        ``top_k``), unused without sampling but noticed in the log as flags that "may be ignored".

        Example:
            >>> DecodingConfig(max_new_tokens=5, num_beams=2).generation_config().num_beams
            2
        """
        special = {k: v for k, v in (("pad_token_id", pad_token_id), ("eos_token_id", eos_token_id)) if v is not None}
        return GenerationConfig(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False,
                                no_repeat_ngram_size=self.no_repeat_ngram,  # 0: off, as in transformers
                                temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0, **special)


class Inputs:
    """What :func:`generate` decodes from: items a model family batches its own way.

    A subclass sets ``items`` and implements :meth:`batch`; it may change the batching :meth:`order` (the answers
    come back in item order whatever it is), say which tokens of the output are the answer (:meth:`answer`), and
    name special tokens the decode stops and pads with (``pad_token_id``, ``eos_token_id``; None: the model's own).
    """

    items: Sequence[Any] = ()
    pad_token_id: int | None = None
    eos_token_id: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def order(self) -> list[int]:
        """The order in which items are batched (default: as given)."""
        return list(range(len(self.items)))

    def batch(self, indices: list[int], device: torch.device) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """A context that yields the ``generate`` inputs of these items on ``device``."""
        raise NotImplementedError

    def answer(self, sequences: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The answer tokens of ``generate``'s output (default: all of it)."""
        return sequences


class TokenPrompts(Inputs):
    """Tokenised prompts of a decoder-only LM, left-padded (the answer follows each prompt's last token) and
    batched by length (similar lengths share a batch); the decode pads and stops with ``tokenizer``'s tokens."""

    def __init__(self, prompts: Sequence[list[int]], tokenizer) -> None:
        self.items = prompts
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id

    def order(self) -> list[int]:
        return sorted(range(len(self.items)), key=lambda i: len(self.items[i]))

    @contextlib.contextmanager
    def batch(self, indices: list[int], device: torch.device) -> Iterator[dict[str, Any]]:
        width = max(len(self.items[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_token_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            n = len(self.items[i])
            ids[row, width - n:] = torch.tensor(self.items[i])
            mask[row, width - n:] = 1
        yield {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def answer(self, sequences: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return sequences[:, batch["input_ids"].size(1):]  # a causal LM returns the prompt too


@torch.no_grad()
def generate(model, tokenizer, inputs: Inputs, cfg: DecodingConfig, *, precision: str, desc: str = "generating",
             **model_args: Any) -> list[str]:
    """The decoded answer (stripped, special tokens dropped) to every item of ``inputs``, in item order.

    ``model.generate`` is transformers' own (a causal LM, a composed model, Whisper); it gets each batch's inputs,
    their attention mask and one ``GenerationConfig`` from ``cfg``, and nothing else but ``model_args`` (arguments
    of the model's ``generate`` that are not generation settings: Whisper's ``language``, ``task``,
    ``prompt_ids``).

    Precision: decoding runs under the autocast of ``precision``, the run's resolved training precision
    (:func:`~modaltune.shared.training.resolve_precision`), on every device: the model is measured as it was
    trained and validated, and a model that trains in bf16 decodes in bf16.
    """
    model.eval()
    device = model.device
    config = cfg.generation_config(pad_token_id=inputs.pad_token_id, eos_token_id=inputs.eos_token_id)
    order = inputs.order()
    answers: dict[int, str] = {}
    for start in tqdm(range(0, len(order), cfg.batch_size), desc=desc, leave=False):
        indices = order[start:start + cfg.batch_size]
        with inputs.batch(indices, device) as batch, autocast(precision, device), _known_notices_dropped():
            out = model.generate(**batch, generation_config=config, **model_args)
        sequences = out.sequences if hasattr(out, "sequences") else out
        texts = tokenizer.batch_decode(inputs.answer(sequences, batch), skip_special_tokens=True)
        answers.update(zip(indices, (t.strip() for t in texts)))
    return [answers[i] for i in range(len(inputs))]


# Notices transformers gives whatever the caller passes, each about behaviour modaltune means: Whisper's generate
# calls the generic generate with a GenerationConfig plus suppress_tokens/begin_suppress_tokens arguments
# (transformers PR #48108) and with the max_length of its own generation config beside our max_new_tokens (which
# applies); a composed model decodes from embeddings, where no_repeat_ngram blocks repeats within the answer (the
# documented behaviour: the prompt is not text to match).
_LOGGED = ("Passing `generation_config` together with generation-related arguments", "Both `max_new_tokens`")
_WARNED = "Passing `no_repeat_ngram_size` with `inputs_embeds` and without `input_ids`"


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LOGGED)


@contextlib.contextmanager
def _known_notices_dropped() -> Iterator[None]:
    logger = logging.getLogger("transformers.generation.utils")
    drop = _DropNotices()
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape(_WARNED), category=UserWarning)
            yield
    finally:
        logger.removeFilter(drop)
