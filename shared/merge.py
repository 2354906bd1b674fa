"""The one merge: a checkpoint's adapters folded into its base model's weights, saved as a plain transformers folder.

``modaltune merge`` (:func:`merge`) rebuilds the model with :func:`merge_config` (fp32, quantised components as plain
LoRA), loads the checkpoint and lets the recipe save it (:meth:`modaltune.shared.recipe.Recipe.merge`), which folds
each component's adapters in with :func:`merged`; :func:`copy_licences` carries the base model's licence files along
and :func:`deploy_generation_config` gives a merged language model the decoding it was evaluated with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

from modaltune.shared import checkpoint as ckpt
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.peft import ComponentConfig, method_of
from modaltune.shared.recipe import get_recipe
from modaltune.shared.runfolder import check_out_folder
from modaltune.shared.training import resolve_precision
from modaltune.shared.trust import checkpoint_config

LICENCE_NAMES = ("licen", "notice", "copying", "terms", "use_policy", "acceptable_use")


def merge_config(cfg: Any) -> Any:
    """The config a merge rebuilds the model with: fp32, no gradient checkpointing, and each component with the
    method its own ``merge_substitute`` names (quantised ones, QLoRA and 8-bit, as plain LoRA, since adapters merge
    into the full-precision base they were trained on).

    Raises:
        ModaltuneError: a component's method has nothing to merge (prompt or prefix tuning: virtual tokens).
    """
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, ComponentConfig):
            substitute = method_of(value).merge_substitute(f.name)
            if substitute != value.method:
                changes[f.name] = dataclasses.replace(value, method=substitute)
    train = getattr(cfg, "train", None)
    if train is not None:
        changes["train"] = dataclasses.replace(train, precision="fp32", gradient_checkpointing=False)
    return dataclasses.replace(cfg, **changes)


def deploy_generation_config(base: Any, tokenizer: Any, decoding: Any) -> Any:
    """The generation settings a merged model is evaluated with, for its ``generation_config.json``: greedy decoding
    (the base's sampling settings dropped) as ``decoding`` (a :class:`~modaltune.shared.generation.DecodingConfig`)
    sets it, stopping at the tokenizer's EOS, as the model was trained to."""
    cfg = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    eos = [tokenizer.eos_token_id] + [e for e in eos if e is not None and e != tokenizer.eos_token_id]
    cfg.update(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=decoding.max_new_tokens,
               num_beams=decoding.num_beams, no_repeat_ngram_size=decoding.no_repeat_ngram,
               eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return cfg


def merged(module: Any, dtype: Any = None) -> Any:
    """``module`` with its PEFT adapters merged into its weights (itself when it has none), then cast to ``dtype``
    (a ``torch.dtype``; the merge itself runs in the precision the module was rebuilt in, fp32)."""
    out = module.merge_and_unload() if hasattr(module, "merge_and_unload") else module
    return out.to(dtype) if dtype is not None else out


def merge(checkpoint: str, out: str, log: Callable[[str], None] = print, overrides: list[str] | None = None,
          dtype: str | None = None) -> Path:
    """Merge a checkpoint's adapters into its base model and save a plain transformers folder at ``out`` in
    ``dtype`` (bf16, fp16 or fp32; default the precision the run trained in).

    Licence and notice files of the base model folders travel into ``out`` with the weights.
    """
    meta = ckpt.read_meta(checkpoint)
    recipe = get_recipe(str(meta.get("recipe")))
    cfg = checkpoint_config(recipe, meta, overrides, checkpoint)
    out_path = Path(out)
    if out_path.is_dir() and any(out_path.iterdir()):
        raise ModaltuneError(f"--out {out!r} exists and is not empty; choose a new folder")
    check_out_folder(out_path)
    if dtype is None:
        dtype = resolve_precision(getattr(getattr(cfg, "train", None), "precision", "fp32"))
    copied = copy_licences(recipe.merge(cfg, Path(checkpoint), out_path, log, dtype=dtype) or [], out_path)
    if copied:
        log(f"carried the base model's licence files into {out}: {', '.join(copied)}")
    (out_path / "modaltune-merge.json").write_text(
        json.dumps({"checkpoint": os.path.abspath(checkpoint), "recipe": recipe.name,
                    "base_model": (meta.get("model_source") or {}).get("name"), "dtype": dtype,
                    "licence_files": copied}, indent=2) + "\n",
        encoding="utf-8",
    )
    return out_path


def copy_licences(pairs: list[tuple[str | Path, Path]], out: Path) -> list[str]:
    """Copy the licence, notice and terms files of each base model folder into its merged folder; returns their
    paths relative to ``out``."""
    copied = []
    for source, dest in pairs:
        source = Path(source)
        if not source.is_dir():
            continue
        for file in sorted(source.iterdir()):
            if file.is_file() and any(key in file.name.lower() for key in LICENCE_NAMES):
                shutil.copy2(file, Path(dest) / file.name)
                copied.append((Path(dest) / file.name).relative_to(out).as_posix())
    return copied
