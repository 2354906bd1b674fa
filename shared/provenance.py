"""Which run a checkpoint belongs to, so a resume never continues another run's weights.

Every checkpoint records the identity of the run that wrote it (``modaltune.json``, key ``run``): a hash of the
resolved config, the seed, a fingerprint of each stage's training data and the code version. ``train.resume``
continues a checkpoint only when the identity matches, and otherwise names what differs; taking another run's
weights on purpose is ``train.resume_from=PATH``, which starts a new run from them.

Example:
    >>> config_differences({"train": {"lr": 1e-4, "resume": False}}, {"train": {"lr": 2e-4, "resume": True}})
    ['train.lr: 0.0001 there, 0.0002 now']
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modaltune.shared.errors import ModaltuneError

# settings that change how a run is watched or saved, never what it trains: a resume may change them
NOT_IDENTITY = ("train.resume", "train.report_to", "train.num_workers", "train.save_steps", "train.save_total_limit",
                "train.logging_steps", "train.nonfinite_patience")
SHOWN = 5


def flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{dotted key: value}``.

    Example:
        >>> flat({"a": {"b": 1}, "c": [1, 2]})
        {'a.b': 1, 'c': [1, 2]}
    """
    if isinstance(data, dict):
        return {k: v for key, val in data.items() for k, v in flat(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def config_differences(earlier: dict, now: dict, ignore: tuple[str, ...] = NOT_IDENTITY) -> list[str]:
    """``key: value there, value now`` for each config key whose value differs (``ignore`` aside), sorted."""
    a, b = flat(earlier), flat(now)
    keys = sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys]


def _feed(h: Any, value: Any) -> None:
    """Add ``value`` to hash ``h`` by content: tensors and arrays by their bytes, containers element by element."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(data) + data)
    elif value is None or isinstance(value, (bool, int, float)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, (list, tuple)):
        try:  # token ids: one buffer instead of one update per number
            h.update(b"L%d:" % len(value) + array.array("q", value).tobytes())
        except (TypeError, OverflowError):
            h.update(b"L%d[" % len(value))
            for v in value:
                _feed(h, v)
            h.update(b"]")
    elif isinstance(value, dict):
        h.update(b"D%d{" % len(value))
        for k in sorted(value, key=str):
            _feed(h, str(k))
            _feed(h, value[k])
        h.update(b"}")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _feed(h, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    elif isinstance(value, Path):
        _feed(h, str(value))
    else:  # an object with no content we can read stably: its type only
        h.update(f"O{type(value).__qualname__};".encode())


def fingerprint(*values: Any) -> str:
    """A content hash of plain data (strings, numbers, lists, dicts, dataclasses, arrays, tensors).

    Example:
        >>> fingerprint([1, 2], "a") == fingerprint([1, 2], "a") != fingerprint([2, 1], "a")
        True
    """
    h = hashlib.blake2b(digest_size=16)
    for value in values:
        _feed(h, value)
    return h.hexdigest()


def data_fingerprint(dataset: Any) -> str:
    """The fingerprint of a training data set: its own ``fingerprint()`` where it has one (say, the content keys of
    cached inputs instead of their encoder states), else every item's content, in order."""
    own = getattr(dataset, "fingerprint", None)
    if callable(own):
        return str(own())
    h = hashlib.blake2b(digest_size=16)
    h.update(b"N%d;" % len(dataset))
    for i in range(len(dataset)):
        _feed(h, dataset[i])
    return h.hexdigest()


def code_version() -> dict[str, str | None]:
    """modaltune's version, the git commit of a source checkout (None when installed from a wheel), and the versions
    of the libraries the numerics depend on."""
    from modaltune.shared.checkpoint import versions

    found = dict(versions())
    found.pop("python", None)
    root = Path(__file__).resolve().parent.parent
    commit = None
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    found["commit"] = commit
    return found


def run_identity(config: dict[str, Any], data: dict[str, str]) -> dict[str, Any]:
    """The identity a checkpoint records: config hash (keys in :data:`NOT_IDENTITY` aside), seed, the stages' data
    fingerprints, code version."""
    kept = {k: v for k, v in flat(config).items() if k not in NOT_IDENTITY}
    return {"config_sha256": hashlib.sha256(repr(sorted(kept.items())).encode()).hexdigest()[:16],
            "seed": (config.get("train") or {}).get("seed"), "data": dict(data), "code": code_version()}


def differences(meta: dict[str, Any], config: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """What differs between the run that wrote a checkpoint (its ``modaltune.json``) and this one: config keys, seed,
    training data per stage, and the modaltune or library versions (a commit of a source checkout is not compared:
    rebuilding the same code gives another one)."""
    out = []
    earlier = meta.get("config") or {}
    seed_then, seed_now = (earlier.get("train") or {}).get("seed"), (config.get("train") or {}).get("seed")
    if seed_then != seed_now:
        out.append(f"seed: {seed_then} there, {seed_now} now")
    out += [d for d in config_differences(earlier, config) if not d.startswith("train.seed:")]
    saved = meta.get("run") or {}
    for stage, digest in (saved.get("data") or {}).items():
        now = identity["data"].get(stage)
        if now is not None and now != digest:
            out.append(f"training data of stage {stage!r} (fingerprint {digest} there, {now} now)")
    code = saved.get("code") or {}
    for lib, version in code.items():
        if lib != "commit" and version != identity["code"].get(lib):
            out.append(f"{lib} {version} there, {identity['code'].get(lib)} now")
    return out


def check_resume(checkpoint: Path, meta: dict[str, Any], config: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` when it was written by another run than this one.

    Raises:
        ModaltuneError: naming up to five differences and the two ways on (same settings, or ``resume_from``).
    """
    found = differences(meta, config, identity)
    if not found:
        return
    shown = "; ".join(found[:SHOWN]) + (f"; and {len(found) - SHOWN} more" if len(found) > SHOWN else "")
    raise ModaltuneError(
        f"train.resume: {checkpoint} was written by another run ({shown}); resume continues only the same run. "
        f"Resume with that run's settings, or start a new run from its weights on purpose: "
        f"--out NEW_FOLDER train.resume_from={checkpoint}"
    )
