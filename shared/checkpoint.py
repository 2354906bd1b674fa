"""Checkpoints that keep every trained weight, written atomically.

A checkpoint folder holds:

- ``adapter/<component>/``: each component's adapters as a standard PEFT folder, loadable outside modaltune (where
  one PEFT wrapper holds several components, as Whisper's does, one folder named after it: ``adapter/whisper/``).
- ``trained.safetensors``: every other trained tensor (a projector, a fully-trained module, anything a PEFT folder
  does not hold exactly), keyed by its name in the model. Each trained weight is stored once.
- ``modaltune.json``: recipe name, the resolved config, per-component parameter counts, library versions, and
  ``adapter_tensors``: which trained tensor lies under which key of which adapter file.
- ``COMPLETE``: written last, after every other file of the folder (the Trainer's optimizer, scheduler, RNG and
  state files included). It lists each file with its size and SHA-256, so a folder whose write was cut short, or
  whose files were truncated or altered afterwards, is recognised and never loaded or resumed from.

Loading rebuilds the model from the saved config and copies the tensors in, refusing any missing or unexpected key.
A checkpoint is data: nothing in it decides to run code (see :func:`modaltune.shared.trust.checkpoint_config`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modaltune.shared.errors import ModaltuneError
from modaltune.shared.io import as_os_error, atomic_write, atomic_write_json, write_failure

WEIGHTS = "trained.safetensors"
META = "modaltune.json"
MARKER = "COMPLETE"
FORMAT_VERSION = 2  # 2: adapter tensors stored once, in the PEFT folders (1: also in trained.safetensors)
ADAPTER_FILE = "adapter_model.safetensors"
LEGACY_MARKER = "ok\n"  # markers written before checkpoints listed their files


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


def save_checkpoint(
    model: Any, path: str | Path, *, meta: dict[str, Any], tokenizer: Any = None, mark_complete: bool = True
) -> Path:
    """Write ``model``'s trained weights and ``meta`` to ``path`` (a folder); returns it.

    ``mark_complete=False`` leaves the ``COMPLETE`` marker to the caller, who writes more files into the folder
    first (the Trainer's optimizer and state) and then calls :func:`write_marker`.
    """
    path = Path(path)
    state = model.trained_state_dict()
    try:
        _write(model, path, state, meta, tokenizer, mark_complete)
    except Exception as exc:  # noqa: BLE001 - safetensors and torch report a full disk in their own error types
        error = as_os_error(exc, path)
        if error is None:
            raise
        discard(path)  # half written: never loaded; its space comes back
        raise write_failure(error, path.parent, needed=state_bytes(state) + 2**16) from exc
    return path


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes the tensors of ``state`` take on disk."""
    return sum(t.numel() * t.element_size() for t in state.values())


def folder_bytes(path: str | Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def discard(path: str | Path) -> None:
    """Remove a checkpoint folder whose write failed (no marker: it would never load), and so free its space."""
    path = Path(path)
    if path.is_dir() and _marker(path) is None:
        shutil.rmtree(path, ignore_errors=True)


def _write(model: Any, path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any], tokenizer: Any,
           mark_complete: bool) -> None:
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    if marker.exists():
        marker.unlink()  # being rewritten: not complete until the end
    in_adapters = _export_adapters(model, path / "adapter", state, meta.get("model_source"))
    own = {name: tensor for name, tensor in state.items() if name not in in_adapters}
    atomic_write(path / WEIGHTS, lambda tmp: save_file(own, tmp, metadata={"format": "pt"}))
    record = {
        "format_version": FORMAT_VERSION,
        **meta,
        "parameters": model.parameter_report(),
        "tensors": len(state),
        "components": dict(getattr(model, "components", {})),  # component -> its module path in the model
        "adapter_tensors": in_adapters,
        "versions": versions(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(path / META, record)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path / "tokenizer"))
    if mark_complete:
        write_marker(path)


def _digest(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listing(path: Path) -> list[Path]:
    """Every file of a checkpoint folder except the marker and atomic-write leftovers, sorted."""
    return sorted(
        f for f in path.rglob("*")
        if f.is_file() and f.name != MARKER and not (f.name.startswith(".") and f.name.endswith(".tmp"))
    )


def write_marker(path: str | Path) -> None:
    """Write the ``COMPLETE`` marker: every file of ``path`` with its size and SHA-256 (call it last)."""
    path = Path(path)
    files = {f.relative_to(path).as_posix(): {"bytes": f.stat().st_size, "sha256": _digest(f)} for f in _listing(path)}
    atomic_write_json(path / MARKER, {"format_version": FORMAT_VERSION, "files": files})


def _marker(path: Path) -> dict | None:
    """The marker's file list (``{}`` for a legacy marker), or None when there is no readable marker."""
    try:
        text = (path / MARKER).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if text == LEGACY_MARKER:
        return {}
    try:
        files = json.loads(text)["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def problem(path: str | Path, *, hashes: bool = True) -> str | None:
    """Why ``path`` is not a usable checkpoint (None when it is): no marker, a listed file missing, truncated or,
    with ``hashes``, changed since it was written."""
    path = Path(path)
    if not path.is_dir():
        return "no such folder"
    files = _marker(path)
    if files is None:
        return f"no {MARKER} marker (its write was interrupted)"
    for required in (WEIGHTS, META):
        if not (path / required).is_file():
            return f"{required} is missing"
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != info.get("bytes"):
            return f"{name} has {size} bytes, {info.get('bytes')} were written (truncated or replaced)"
        if hashes and _digest(file) != info.get("sha256"):
            return f"{name} changed after it was written (SHA-256 differs)"
    return None


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a fully written checkpoint whose files have their written sizes (no hashing)."""
    return problem(path, hashes=False) is None


def _export_adapters(model: Any, folder: Path, state: dict[str, torch.Tensor],
                     source: dict | None = None) -> dict[str, list[str]]:
    """Each component's adapters as a PEFT folder; returns ``{trained name: [component, key]}`` for the trained
    tensors a folder's ``adapter_model.safetensors`` holds bit for bit (those need no second copy).

    The base model is named as the user named it (hub id, zoo name or folder), not by the cache path it was loaded
    from, so the folder means the same on another machine.
    """
    by_storage = {(p.data_ptr(), tuple(p.shape)): name for name, p in model.named_parameters() if name in state}
    stored: dict[str, list[str]] = {}
    is_peft = lambda m: hasattr(m, "peft_config") and hasattr(m, "save_pretrained")  # noqa: E731
    wrappers = {comp: model.get_submodule(root) for comp, root in model.components.items()}
    wrappers = {comp: m for comp, m in wrappers.items() if is_peft(m)}
    seen = {id(m) for m in wrappers.values()}
    # one PEFT wrapper around several components (Whisper's encoder and decoder): one folder, named by its attribute
    wrappers |= {name: m for name, m in model.named_children() if is_peft(m) and id(m) not in seen}
    for comp, module in wrappers.items():
        module.save_pretrained(str(folder / comp))
        config = folder / comp / "adapter_config.json"
        if source and source.get("name") and config.is_file():
            data = json.loads(config.read_text(encoding="utf-8"))
            if data.get("base_model_name_or_path") == str(source.get("path")):
                data["base_model_name_or_path"] = str(source["name"])
                atomic_write_json(config, data)
        from peft import get_peft_model_state_dict

        saved = load_file(str(folder / comp / ADAPTER_FILE)) if (folder / comp / ADAPTER_FILE).is_file() else {}
        for key, tensor in get_peft_model_state_dict(module).items():
            name = by_storage.get((tensor.data_ptr(), tuple(tensor.shape)))
            if name is not None and key in saved and torch.equal(saved[key], state[name]):
                stored[name] = [comp, key]
    return stored


def read_trained(path: str | Path) -> dict[str, torch.Tensor]:
    """Every trained tensor of a checkpoint by its name in the model: ``trained.safetensors`` and the adapter tensors
    its record places in the PEFT folders.

    Raises:
        ModaltuneError: a weights file is damaged or missing (the file is named, with the way out).
    """
    path = Path(path)

    def read(file: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(file), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise ModaltuneError(
                f"checkpoint {str(path)!r}: {file.relative_to(path)} cannot be read ({exc.__class__.__name__}: "
                f"{exc}); the file is damaged: use an earlier checkpoint-N of the run, or retrain"
            ) from None

    state = read(path / WEIGHTS)
    placed = {}
    meta_file = path / META
    if meta_file.is_file():
        try:
            placed = json.loads(meta_file.read_text(encoding="utf-8")).get("adapter_tensors") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ModaltuneError(f"checkpoint {str(path)!r}: {META} is not a modaltune record") from None
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, where in placed.items():
        if not (isinstance(where, list) and len(where) == 2 and all(isinstance(w, str) for w in where)):
            raise ModaltuneError(f"checkpoint {str(path)!r}: {META} places {name!r} nowhere readable")
        comp, key = where
        if comp not in files:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", comp):
                raise ModaltuneError(f"checkpoint {str(path)!r}: {META} names an adapter folder {comp!r} that is not "
                                     "a component name")
            files[comp] = read(path / "adapter" / comp / ADAPTER_FILE)
        if key not in files[comp]:
            raise ModaltuneError(f"checkpoint {str(path)!r}: adapter/{comp}/{ADAPTER_FILE} has no tensor {key!r}; "
                                 "the folder was changed after saving: use an earlier checkpoint-N, or retrain")
        state[name] = files[comp][key]
    return state


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``modaltune.json`` of a checkpoint, with a clear error when the folder is not one."""
    path = Path(path)
    if not path.is_dir():
        raise ModaltuneError(f"checkpoint {str(path)!r} does not exist")
    why = problem(path)
    if why is not None:
        raise ModaltuneError(
            f"{str(path)!r} is not a usable modaltune checkpoint: {why}; use the run's 'checkpoint' folder or an "
            "earlier checkpoint-N"
        )
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModaltuneError(f"checkpoint {str(path)!r}: {META} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config", {}), dict):
        raise ModaltuneError(f"checkpoint {str(path)!r}: {META} does not hold a modaltune record")
    return meta


def load_trained(model: Any, path: str | Path) -> None:
    """Copy the saved trained tensors into ``model`` (built from the same config); keys must match exactly."""
    path = Path(path)
    state = read_trained(path)
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


def _steps(folder: Path) -> list[tuple[int, Path]]:
    return sorted(
        ((int(c.name[11:]), c) for c in folder.iterdir() if c.name.startswith("checkpoint-") and c.name[11:].isdigit()),
        reverse=True,
    ) if folder.is_dir() else []


def latest_checkpoint(folder: str | Path, *, log: Callable[[str], None] | None = None) -> Path | None:
    """The highest-step usable ``checkpoint-N`` under ``folder``.

    A newer folder that is incomplete or damaged (see :func:`problem`) is skipped with one ``log`` line naming it,
    and the previous one is used.
    """
    for _, child in _steps(Path(folder)):
        why = problem(child)
        if why is None:
            return child
        if log is not None:
            log(f"skipping {child}: {why}; resuming from the checkpoint before it")
    return None


def rotate(folder: str | Path, keep: int) -> None:
    """Delete step checkpoints under ``folder`` beyond the ``keep`` newest complete ones.

    Called after a new checkpoint was marked complete, so a run always keeps a complete one to resume from;
    incomplete folders older than the newest complete one go too.
    """
    complete = 0
    for _, child in _steps(Path(folder)):
        if complete < keep and is_complete(child):
            complete += 1
            continue
        if complete >= 1:
            shutil.rmtree(child, ignore_errors=True)
