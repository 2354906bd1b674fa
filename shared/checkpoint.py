"""Checkpoints that keep every trained weight, written atomically.

A checkpoint folder holds:

- ``trained.safetensors``: every trained tensor of the model (LoRA/DoRA/IA3/prompt weights and any fully-trained
  module such as a projector), keyed by its name in the model.
- ``modaltune.json``: recipe name, the resolved config, per-component parameter counts, library versions.
- ``adapter/<component>/``: the same adapters as a standard PEFT folder, for use outside modaltune.
- ``COMPLETE``: written last; a folder without it is an interrupted write and is never loaded or resumed from.

Loading rebuilds the model from the saved config and copies the tensors in, refusing any missing or unexpected key.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modaltune.shared.errors import ModaltuneError
from modaltune.shared.io import atomic_write, atomic_write_json, atomic_write_text

WEIGHTS = "trained.safetensors"
META = "modaltune.json"
MARKER = "COMPLETE"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    """Versions of the libraries a checkpoint depends on."""
    import peft
    import transformers

    import modaltune

    return {
        "modaltune": modaltune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(model: Any, path: str | Path, *, meta: dict[str, Any], tokenizer: Any = None) -> Path:
    """Write ``model``'s trained weights and ``meta`` to ``path`` (a folder); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    if marker.exists():
        marker.unlink()  # being rewritten: not complete until the end
    state = model.trained_state_dict()
    atomic_write(path / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    record = {
        "format_version": FORMAT_VERSION,
        **meta,
        "parameters": model.parameter_report(),
        "tensors": len(state),
        "versions": versions(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(path / META, record)
    _export_adapters(model, path / "adapter")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path / "tokenizer"))
    atomic_write_text(marker, "ok\n")
    return path


def _export_adapters(model: Any, folder: Path) -> None:
    for comp, root in model.components.items():
        module = model.get_submodule(root)
        if hasattr(module, "peft_config") and hasattr(module, "save_pretrained"):
            module.save_pretrained(str(folder / comp))


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a fully written checkpoint."""
    path = Path(path)
    return (path / MARKER).is_file() and (path / WEIGHTS).is_file() and (path / META).is_file()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``modaltune.json`` of a checkpoint, with a clear error when the folder is not one."""
    path = Path(path)
    if not path.is_dir():
        raise ModaltuneError(f"checkpoint {str(path)!r} does not exist")
    if not is_complete(path):
        raise ModaltuneError(
            f"{str(path)!r} is not a complete modaltune checkpoint (no {MARKER} marker: the write was interrupted, "
            f"or this is not a checkpoint folder); use the run's 'checkpoint' folder or an earlier checkpoint-N"
        )
    return json.loads((path / META).read_text(encoding="utf-8"))


def load_trained(model: Any, path: str | Path) -> None:
    """Copy the saved trained tensors into ``model`` (built from the same config); keys must match exactly."""
    path = Path(path)
    state = load_file(str(path / WEIGHTS), device="cpu")
    expected = model.trained_state_dict().keys()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModaltuneError(
            f"checkpoint {str(path)!r} does not fit this model: {len(missing)} trained tensors missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            "was it saved with a different config (method, targets, rank)?"
        )
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, tensor in state.items():
            target = params.get(name, buffers.get(name))
            if target.shape != tensor.shape:
                raise ModaltuneError(
                    f"checkpoint {str(path)!r}: {name} has shape {tuple(tensor.shape)}, model expects "
                    f"{tuple(target.shape)}"
                )
            target.copy_(tensor.to(target.device, target.dtype))


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The highest-step complete ``checkpoint-N`` under ``folder`` (interrupted writes are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        if child.name.startswith("checkpoint-") and child.name[11:].isdigit() and is_complete(child):
            found.append((int(child.name[11:]), child))
    return max(found)[1] if found else None
