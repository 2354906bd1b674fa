"""The before/after evaluation harness every recipe uses: timing, "before" metrics kept for resumed runs, item
pairing across columns, grouped before/after bar charts, and the one merge.

A recipe measures its model before training and after each stage; these helpers own what is the same for every
modality: how long each part took (``report["timing"]``), reusing the "before" column when a run resumes (the
model it measured is gone by then), one row per test item with every column's output side by side, and the
charts people compare.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modaltune.shared import dist
from modaltune.shared.errors import ModaltuneError

BEFORE_FILE = "before.json"


@contextlib.contextmanager
def timed(report: dict[str, Any], name: str) -> Iterator[None]:
    """Record the seconds the block took as ``report["timing"][name]``."""
    started = time.time()
    try:
        yield
    finally:
        report.setdefault("timing", {})[name] = round(time.time() - started, 2)


def measure_before(run_dir: Path, resume: bool, measure: Callable[[], tuple[dict, list[dict]]], *,
                   name: str = BEFORE_FILE, collective: bool = False) -> tuple[dict, list[dict]]:
    """The "before" column: measured now and saved in ``run_dir`` (as ``name``), or, on a resumed run, read back
    from there (the untrained model it describes cannot be rebuilt once training has moved the weights on disk;
    a baseline that trains a model of its own is not worth training twice).

    Under a launcher ``measure`` runs on rank 0 (:func:`modaltune.shared.dist.on_main`) and every rank gets its
    result; ``collective=True`` runs it on every rank instead, for a baseline that trains (its own evaluation then
    goes through ``on_main``). Only rank 0 writes the file.
    """
    path = Path(run_dir) / name
    if resume and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        return saved["metrics"], saved["items"]
    metrics, items = measure() if collective else dist.on_main(measure, "measuring the untrained model")
    if dist.is_main():
        from modaltune.shared.io import atomic_write_json

        atomic_write_json(path, {"metrics": metrics, "items": items})
    return metrics, items


def pair_items(columns: dict[str, list[dict]], *, key: tuple[str, ...], keep: tuple[str, ...], value: str | None,
               extra: Callable[[dict[str, dict]], dict] | None = None,
               sort: Callable[[dict], Any] | None = None) -> list[dict]:
    """One row per item of the last column, with every column's ``value`` beside it.

    Args:
        columns: column name (``before``, ``after_caption``, ``after``) -> per-item rows, in order.
        key: fields that identify an item across columns (``("id",)``, ``("set", "id")``).
        keep: fields copied from the last column's row (the reference, the question, ...).
        value: the field each column contributes under its own name (the prediction); None: none.
        extra: more fields from ``{column: row}`` of one item (per-item scores).
        sort: sort key of the paired rows (worst first, typically).

    Example:
        >>> pair_items({"before": [{"id": 1, "p": "a"}], "after": [{"id": 1, "p": "b", "ref": "b"}]},
        ...            key=("id",), keep=("ref",), value="p")
        [{'id': 1, 'ref': 'b', 'before': 'a', 'after': 'b'}]
    """
    if not columns:
        return []
    names = list(columns)
    index = {name: {tuple(r.get(k) for k in key): r for r in rows} for name, rows in columns.items()}
    rows = []
    for last in columns[names[-1]]:
        ident = tuple(last.get(k) for k in key)
        found = {name: index[name].get(ident, {}) for name in names}
        row = {k: last.get(k) for k in key}
        row.update({k: last.get(k) for k in keep})
        if value is not None:
            row.update({name: found[name].get(value) for name in names})
        if extra is not None:
            row.update(extra(found))
        rows.append(row)
    if sort is not None:
        rows.sort(key=sort)
    return rows


def grouped_bars(path: Path, metrics: dict[str, dict[str, float]], keys: list[str], *, labels: list[str],
                 legend: dict[str, str], title: str, ylabel: str, rotate: bool = False) -> Path:
    """A grouped bar chart: one group per metric key, one bar per column of ``metrics`` named in ``legend``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in legend if c in metrics]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(keys)), 3.6))
    width = 0.8 / max(len(cols), 1)
    for j, col in enumerate(cols):
        vals = [metrics[col].get(k, float("nan")) for k in keys]
        bars = ax.bar([i + j * width for i in range(len(keys))], vals, width, label=legend[col])
        ax.bar_label(bars, fmt="%.2f", fontsize=7 if rotate else 8)
    ax.set_xticks([i + width * (len(cols) - 1) / 2 for i in range(len(keys))], labels,
                  **({"rotation": 20, "ha": "right", "fontsize": 8} if rotate else {}))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)
    if dist.is_main():  # one writer per run under a launcher
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def data_line(counts: dict[str, dict]) -> str:
    """``train 3000 kept / 5 skipped (35570 capped), ...`` for the log."""
    parts = []
    for name, v in counts.items():
        capped = f" ({v['capped']} left out by size caps)" if v.get("capped") else ""
        parts.append(f"{name} {v['kept']} kept / {v['skipped']} skipped{capped}")
    return "data: " + ", ".join(parts)


def metric_line(metrics: dict[str, float], keys: Callable[[str], bool] | None = None, digits: int = 3) -> str:
    """``k=v, ...`` of the metrics (those ``keys`` accepts), sorted by name."""
    return ", ".join(f"{k}={v:.{digits}f}" for k, v in sorted(metrics.items()) if keys is None or keys(k))


def merge_config(cfg: Any) -> Any:
    """The config a merge rebuilds the model with: fp32, no gradient checkpointing, and every quantised component
    (QLoRA, 8-bit) as plain LoRA, since adapters merge into the full-precision base they were trained on.

    Raises:
        ModaltuneError: a component uses prompt or prefix tuning (virtual tokens have no weights to merge into).
    """
    from modaltune.shared.peft import PROMPT_METHODS, QUANTISED, ComponentConfig

    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, ComponentConfig):
            if value.method in PROMPT_METHODS:
                raise ModaltuneError(
                    f"{f.name}.method={value.method} adds virtual tokens that cannot be merged into weights; load "
                    f"the checkpoint's adapter folder with peft instead")
            if value.method in QUANTISED:
                changes[f.name] = dataclasses.replace(value, method="lora")
    train = getattr(cfg, "train", None)
    if train is not None:
        changes["train"] = dataclasses.replace(train, precision="fp32", gradient_checkpointing=False)
    return dataclasses.replace(cfg, **changes)


def deploy_generation_config(base: Any, tokenizer: Any, decoding: Any) -> Any:
    """The generation settings a merged model is evaluated with, for its ``generation_config.json``: greedy decoding
    (the base's sampling settings dropped) as ``decoding`` (a :class:`~modaltune.shared.generation.DecodingConfig`)
    sets it, stopping at the tokenizer's EOS, as the model was trained to."""
    from transformers import GenerationConfig

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
