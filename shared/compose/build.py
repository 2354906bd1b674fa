"""Building a composed model from configs (pretrained parts, each with its tuning method), and saving it merged.

:func:`build_composed_lm` is what a recipe calls; :func:`save_merged` writes the ``from_pretrained`` folder that
``modaltune merge`` gives for a composed recipe, and :func:`load_legacy_composition` reads the folders earlier
versions wrote (``composition.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from modaltune.shared.compose.core import ComposedConfig, ComposedLM
from modaltune.shared.compose.parts import EncoderConfig, ProjectorConfig, build_encoder, build_projector
from modaltune.shared.compose.projectors import embedding_rms
from modaltune.shared.config import from_dict, to_dict
from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.lm import ModelConfig, load_causal_lm
from modaltune.shared.loss import unwrap_peft
from modaltune.shared.merge import merged
from modaltune.shared.peft import ComponentConfig, ComponentSpec, apply_peft, method_of


def build_composed_lm(*, encoder: EncoderConfig, encoder_tuning: ComponentConfig, model: ModelConfig,
                      llm: ComponentConfig, projector: ProjectorConfig, compute_dtype: torch.dtype = torch.float32,
                      label_logits_only: bool = True, gradient_checkpointing: bool = False,
                      log: Callable[[str], None] = print) -> tuple[ComposedLM, Any, dict[str, Any]]:
    """Compose ``encoder -> grouping -> projector -> causal LM`` and apply each component's tuning method.

    Args:
        encoder: the encoder to build (:func:`~modaltune.shared.compose.parts.build_encoder`, pretrained weights).
        encoder_tuning: the encoder's :class:`~modaltune.shared.peft.ComponentConfig` (frozen, lora, full, ...).
        model: the LLM's :class:`~modaltune.shared.lm.ModelConfig`.
        llm: the LLM's :class:`~modaltune.shared.peft.ComponentConfig`.
        projector: the projector and token grouping.
        compute_dtype: compute dtype of quantised layers.
        label_logits_only: the output layer runs only at answer positions.
        gradient_checkpointing: trade compute for memory in the LLM.
        log: progress lines.

    Returns:
        ``(ComposedLM, tokenizer, source)``; with ``norm=words/both`` the anchor words are placeholders until
        :func:`~modaltune.shared.compose.reading.anchor_on_text` (a run) or a checkpoint (evaluate, merge) fills
        them.
    """
    built = build_encoder(encoder, log=log)
    if method_of(llm).virtual_tokens:
        raise ConfigError("llm.method: prompt/prefix tuning cannot take spliced encoder tokens; use lora, dora, ...")
    built = apply_peft(built, [ComponentSpec("encoder", "", encoder_tuning)], causal_lm=False)
    lm, tok, source = load_causal_lm(model, method=llm.method, compute_dtype=compute_dtype,
                                     quantize_head=llm.quantize_head, log_fn=log)
    if not method_of(llm).trains:
        for p in lm.parameters():
            p.requires_grad_(False)
    else:
        lm = apply_peft(lm, [ComponentSpec("llm", "", llm)])
    hidden = unwrap_peft(lm).get_input_embeddings().embedding_dim
    scale = embedding_rms(lm) if projector.norm in {"rms", "both"} else None
    words = torch.zeros(projector.anchor_words, hidden) if projector.uses_words else None
    proj = build_projector(projector.kind, in_dim=unwrap_peft(built).out_dim, out_dim=hidden, group=projector.group,
                           norm=projector.norm, scale=scale, words=words,
                           blank=projector.uses_words and projector.grounding == "ctc", collapse=projector.collapse)
    architecture = getattr(unwrap_peft(built), "architecture", None)
    config = ComposedConfig(encoder=to_dict(encoder), encoder_architecture=architecture() if callable(architecture)
                            else None, projector=to_dict(projector), text_config=unwrap_peft(lm).config.to_dict(),
                            label_logits_only=label_logits_only, encoder_train_mode=method_of(encoder_tuning).full_weights)
    composed = ComposedLM(config, encoder=built, projector=proj, llm=lm)
    full = ["projector"] + [n for n, c in (("encoder", encoder_tuning), ("llm", llm)) if method_of(c).full_weights]
    composed.record_trained(full_components=full)
    if gradient_checkpointing:
        composed.activation_checkpointing_enable()
    return composed, tok, source


def composed_report(model: ComposedLM, encoder: Any, projector: ProjectorConfig, *,
                    cache: bool = True) -> dict[str, Any]:
    """The model section fields every composed recipe reports (``cache``: the recipe's feature cache is on)."""
    depth = unwrap_peft(model.encoder).cache_depth() if cache else None
    return {"encoder": encoder, "projector": projector.kind, "group": projector.group,
            "feature_cache": depth is not None, "feature_cache_depth": depth}


def save_merged(model: ComposedLM, tokenizer: Any, out: str | Path, *, template: str, placeholder: str | None = None,
                dtype: torch.dtype | None = None) -> Path:
    """Save a composed model whose checkpoint is loaded as a ``from_pretrained`` folder: adapters merged into the
    LLM and the encoder (:func:`~modaltune.shared.merge.merged`), every part cast to ``dtype`` (default: as
    built), the tokenizer beside it, and the prompt ``template`` and ``placeholder`` in the config.
    ``AutoModel.from_pretrained(out)`` reads it back (once :mod:`modaltune.shared.compose` is imported). Returns
    ``out``."""
    out = Path(out)
    llm = merged(model.llm, dtype)
    encoder = merged(model.encoder, dtype)
    projector = model.projector.to(dtype) if dtype is not None else model.projector
    old = model.config
    config = ComposedConfig(encoder=old.encoder, encoder_architecture=old.encoder_architecture,
                            projector=old.projector, text_config=llm.config.to_dict(), label_logits_only=old.label_logits_only,
                            encoder_train_mode=old.encoder_train_mode, template=template, placeholder=placeholder)
    ComposedLM(config, encoder=encoder, projector=projector, llm=llm).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


_REMOVED = {"words": "soft", "word_dropout": 0.0}  # projector keys of earlier versions, at their only kept value


def load_legacy_composition(folder: str | Path, *,
                            log: Callable[[str], None] = print) -> tuple[ComposedLM, Any]:
    """A composed model from a folder an earlier ``modaltune merge`` wrote (``composition.json``, ``llm/``,
    ``projector.safetensors`` and, for a tuned encoder, ``encoder.safetensors``): the encoder built as
    ``composition.json`` names it (its own pretrained weights, or the tuned ones), the LLM from ``llm/``, the
    projector's weights. Only data files are read, no code runs. ``model.save_pretrained(new)`` converts it.

    Returns:
        ``(model, tokenizer)``, the model in eval mode with the composition's template and placeholder in its config.

    Raises:
        ModaltuneError: ``folder`` has no ``composition.json``, or it uses an option that no longer exists.
    """
    folder = Path(folder).expanduser()
    path = folder / "composition.json"
    if not path.is_file():
        raise ModaltuneError(f"{folder}: no composition.json; give a folder written by `modaltune merge` of a composed "
                             "recipe (med-vqa, audio-llm) before composed models were transformers models")
    composition = json.loads(path.read_text(encoding="utf-8"))
    projector = dict(composition["projector"])
    for key, kept in _REMOVED.items():
        if projector.pop(key, kept) != kept:
            raise ModaltuneError(f"{path}: projector.{key} is no longer supported (only {kept!r} is)")
    model, tok, _ = build_composed_lm(
        encoder=from_dict(EncoderConfig, composition["encoder"], where="composition.encoder"),
        encoder_tuning=ComponentConfig(), model=ModelConfig(name=str(folder / "llm")), llm=ComponentConfig(),
        projector=from_dict(ProjectorConfig, projector, where="composition.projector"), log=log)
    model.projector.load_state_dict(load_file(str(folder / "projector.safetensors")))
    if (folder / "encoder.safetensors").is_file():
        model.encoder.load_state_dict(load_file(str(folder / "encoder.safetensors")))
    model.config.template, model.config.placeholder = composition.get("template"), composition.get("placeholder")
    return model.eval(), tok
