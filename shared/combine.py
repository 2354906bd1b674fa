"""Combining task adapters in weight space: ``cat``, ``linear``, ``svd``, ``ties`` and ``dare``.

Each input is a LoRA-family adapter (plain LoRA, rsLoRA or DoRA) in a PEFT folder, or a component's adapter in a
modaltune checkpoint. Adapter ``i`` changes a module's weight ``W`` by its effective delta ``D_i``:

- LoRA / rsLoRA: ``D_i = s_i B_i A_i`` with ``s_i = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``);
- DoRA: ``D_i = diag(c_i) (W + s_i B_i A_i) - W`` with ``c_i = m_i / ||W + s_i B_i A_i||`` per output row.

The target of a combination with weights ``w_i`` is ``T = sum_i w_i D_i``. The methods:

``cat``     exact: ``T`` itself, as one adapter of rank ``sum r_i``. With DoRA inputs the row scalings are gathered
            into one: ``T + W = diag(d) (W + B'A')`` with ``d = 1 + sum_i w_i (c_i - 1)``, stored as a DoRA adapter
            whose magnitude is ``d ||W + B'A'||`` (so DoRA and LoRA inputs mix exactly too).
``linear``  the factors mixed entry by entry, keeping the inputs' rank: ``B = sum w_i s_i B_i`` and ``A`` the
            ``|w|``-weighted mean of the ``A_i``. Exact for one adapter, and for adapters that share ``A`` (trained
            from one initialisation with ``A`` frozen, as LoRA-FA does); otherwise the cross terms ``B_i A_j`` make
            it differ from ``T`` (the report says by how much).
``svd``     ``cat``'s result truncated to ``rank`` (default: the largest input rank) by a thin SVD of its factors;
            exact when ``rank`` reaches the sum of the input ranks.
``ties``    TIES-merging of the dense deltas (keep each one's ``density`` largest entries, elect a sign per entry,
            average the entries that agree with it), then SVD to ``rank`` (default: the sum of input ranks).
``dare``    DARE: drop each delta entry with probability ``1 - density`` (seeded), rescale by ``1 / density``,
            sum with the weights, then SVD to ``rank``.

peft's ``add_weighted_adapter`` is not used: it ignores rsLoRA's scale, cannot combine DoRA magnitudes, and its
``linear`` copies one config's scale onto mixed factors. Here every result is written with scale 1 (``lora_alpha``
equal to each module's rank), so the numbers in the folder are the combination. The report gives, per module and in
all, the rank and the relative Frobenius distance of the result from ``T``.
"""

from __future__ import annotations

import dataclasses
import os
import json
import math
import re
import shutil
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modaltune.shared.checkpoint import problem, read_meta, read_trained
from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.io import atomic_write, atomic_write_json, atomic_write_text
from modaltune.shared.peft import adapter_kind, get_method, registered_methods
from modaltune.shared.zoo import resolve_model

HOW = ("cat", "linear", "svd", "ties", "dare")
PREFIX = "base_model.model."
SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m",
            ".lora_magnitude_vector.weight": "m"}
REWRITES_BASE = ("pissa", "olora", "corda", "loftq")  # initialisations that change the base weights themselves


@dataclasses.dataclass
class CombineConfig:
    """How task adapters are combined (a recipe's ``combine:`` section; the flags of ``modaltune combine``)."""

    methods: list[str] = doc(list(HOW), "combinations to build and evaluate: cat | linear | svd | ties | dare")
    weights: list[float] | None = doc(None, "one weight per adapter (null: 1.0 each, the sum of the task changes)")
    rank: int | None = doc(None, "svd/ties/dare: rank of the result (null: svd the largest input rank, ties/dare "
                                 "the sum of the input ranks)")
    density: float = doc(0.5, "ties/dare: fraction of each weight change kept")
    seed: int = doc(0, "dare: seed of the random drop")

    def validate(self, where: str) -> None:
        unknown = [m for m in self.methods if m not in HOW]
        if unknown or not self.methods:
            raise ConfigError(f"{where}.methods: {unknown or 'empty'}; choose from {', '.join(HOW)}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"{where}.density must be in (0, 1], got {self.density}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"{where}.rank must be at least 1, got {self.rank}")


@dataclasses.dataclass
class Factors:
    """One module's LoRA factors: ``A`` (r x in), ``B`` (out x r), scale, and DoRA's magnitude (out) if any."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None


@dataclasses.dataclass
class Adapter:
    """A LoRA-family adapter read from a folder: its config and per-module factors."""

    label: str
    folder: Path
    config: dict[str, Any]
    modules: dict[str, Factors]

    @property
    def kind(self) -> str:
        return adapter_kind(self.config)


def adapter_folder(source: str | Path, component: str | None = None) -> Path:
    """The PEFT folder ``source`` names: a PEFT adapter folder, or a modaltune checkpoint (``component`` picks one of
    its adapters; the only one by default)."""
    path = Path(source).expanduser()
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "modaltune.json").is_file():
        broken = problem(path)
        if broken:
            raise ModaltuneError(f"checkpoint {path} is not usable: {broken}")
        found = sorted(p.parent.name for p in (path / "adapter").glob("*/adapter_config.json"))
        inside = _wrapped_components(path)
        if (component in inside and component not in found) or (component is None and not found and len(inside) == 1):
            return path  # one component of a PEFT wrapper around several (Whisper's): read from the trained weights
        found = sorted(set(found) | set(inside))
        if component is None and len(found) == 1:
            component = found[0]
        if component is None or component not in found:
            raise ModaltuneError(
                f"checkpoint {path} has adapters for {found or 'no component'}; "
                + (f"name one as {path}:COMPONENT" if found else "it trained no adapter (full or frozen components "
                   "have nothing to combine; merge it instead)"))
        return path / "adapter" / component
    raise ModaltuneError(f"{source} is neither a PEFT adapter folder (adapter_config.json) nor a modaltune checkpoint "
                         "(modaltune.json)")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():  # peft's rule: a pattern matches the end of the module path
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _wrapped_components(checkpoint: Path) -> dict[str, str]:
    """A checkpoint's LoRA-tuned components whose adapters sit in one PEFT wrapper of the whole model (Whisper's
    encoder and decoder), not in PEFT folders of their own: ``{component: its path inside the wrapped model}``."""
    meta = read_meta(checkpoint)
    out = {}
    for comp, root in (meta.get("components") or {}).items():
        section = (meta.get("config") or {}).get(comp)
        method = section.get("method") if isinstance(section, dict) else None
        if method in {m.name for m in registered_methods() if m.lora_family} and PREFIX in root + ".":
            out[comp] = (root + ".").split(PREFIX, 1)[1].rstrip(".")
    return out


def _from_checkpoint(path: Path, component: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The PEFT config and tensors of ``component``'s adapter read from a checkpoint's trained weights."""
    inside = _wrapped_components(path)
    component = component or next(iter(inside))
    root, meta = inside[component], read_meta(path)
    section = meta["config"][component]
    tensors = {}
    for name, tensor in read_trained(path).items():
        module = name.split(PREFIX, 1)[1] if PREFIX in name else ""
        if module.startswith(root + ".") and ".lora_" in module:  # drop peft's adapter name, as its files do
            tensors[PREFIX + re.sub(r"\.(lora_[A-Za-z_]+)\.default(\.|$)", r".\1\2", module)] = tensor
    source = meta.get("model_source") or {}
    try:
        r, alpha = int(section["r"]), float(section["alpha"])
    except (KeyError, TypeError, ValueError):
        raise ModaltuneError(f"checkpoint {path}: its config gives {component} no usable r and alpha; the record "
                             "was changed after saving") from None
    if not tensors:
        raise ModaltuneError(f"checkpoint {path} holds no LoRA factors under {component} ({root})")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": False,
              "use_dora": getattr(get_method(section["method"]), "use_dora", False), "base_model_name_or_path": source.get("name") if isinstance(source, dict) else None,
              "fan_in_fan_out": False}
    return config, tensors


def read_adapter(source: str | Path, label: str | None = None) -> Adapter:
    """Read a LoRA/rsLoRA/DoRA adapter (``source`` as for :func:`adapter_folder`, with ``:COMPONENT`` allowed)."""
    text = str(source)
    component = None
    if ":" in text and not Path(text).exists():
        text, component = text.rsplit(":", 1)
    folder = adapter_folder(text, component)
    if (folder / "modaltune.json").is_file():  # a checkpoint whose adapters live in its trained weights
        config, tensors = _from_checkpoint(folder, component)
        return _adapter_from(config, tensors, folder, f"adapter {component or ''} of checkpoint {folder}", label)
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModaltuneError(f"{folder}/adapter_config.json is not readable JSON: {exc}") from None
    where = f"adapter {folder}"
    if config.get("peft_type") != "LORA":
        raise ModaltuneError(f"{where} is {config.get('peft_type')}; combine takes LoRA, rsLoRA and DoRA adapters")
    if config.get("modules_to_save"):
        raise ModaltuneError(f"{where} also trains whole modules ({config['modules_to_save']}); combining full "
                             "copies of a module is not defined; train the adapters without modules_to_save")
    if config.get("lora_bias"):
        raise ModaltuneError(f"{where} trains LoRA biases (lora_bias); combine takes adapters without them")
    init = str(config.get("init_lora_weights"))
    if init.lower().startswith(REWRITES_BASE):
        raise ModaltuneError(f"{where} was initialised with {init}, which changes the base weights; convert it to "
                             "a plain LoRA first (peft's path_initial_model_for_weight_conversion)")
    files = [folder / "adapter_model.safetensors"]
    if not files[0].is_file():
        raise ModaltuneError(f"{where} has no adapter_model.safetensors (a .bin adapter is not loaded: it could run "
                             "code; convert it to safetensors)")
    return _adapter_from(config, load_file(str(files[0])), folder, where, label)


def _adapter_from(config: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path, where: str,
                  label: str | None) -> Adapter:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name.endswith(".bias"):
            raise ModaltuneError(f"{where} holds {key}: it trains biases (bias='{config.get('bias')}'), which are "
                                 "whole-module changes, not LoRA factors; train the adapters with bias='none'")
        for suffix, part in SUFFIXES.items():
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[part] = tensor
                break
        else:
            raise ModaltuneError(f"{where} holds {key}, which is not a linear layer's LoRA factor (embedding or "
                                 "convolution LoRA, trainable tokens); combine takes linear-layer adapters")
    modules: dict[str, Factors] = {}
    for name, found in sorted(parts.items()):
        if "A" not in found or "B" not in found:
            raise ModaltuneError(f"{where}: module {name} lacks its lora_A or lora_B matrix")
        if found["A"].ndim != 2 or found["B"].ndim != 2:
            raise ModaltuneError(f"{where}: module {name} is a convolution LoRA (factors of shape "
                                 f"{tuple(found['A'].shape)}); combine takes linear-layer adapters")
        if found["B"].shape[1] != found["A"].shape[0] or ("m" in found and found["m"].shape[0] != found["B"].shape[0]):
            raise ModaltuneError(f"{where}: module {name} has factors that do not fit together (A "
                                 f"{tuple(found['A'].shape)}, B {tuple(found['B'].shape)}); the file is damaged")
        r = found["A"].shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", r)))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[name] = Factors(found["A"].double(), found["B"].double(), scale,
                                found["m"].double() if "m" in found else None)
    if not modules:
        raise ModaltuneError(f"{where} holds no LoRA factors")
    return Adapter(label or folder.name, folder, config, modules)


class BaseWeights:
    """The base model's weights, read one matrix at a time from its safetensors files (needed for DoRA only)."""

    def __init__(self, name: str, log: Callable[[str], None] = print) -> None:
        path, kind = resolve_model(name, log=log)
        folder = Path(path)
        if not folder.is_dir():  # a hub id not yet on this machine
            folder = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
        self.files = sorted(folder.glob("*.safetensors"))
        if not self.files:
            raise ModaltuneError(f"base model {name} ({folder}) has no .safetensors weights to read DoRA's norms from")
        self.where: dict[str, Path] = {}
        for file in self.files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    self.where[key] = file
        self.name = name

    def weight(self, module: str, fan_in_fan_out: bool = False) -> torch.Tensor:
        key = f"{module}.weight"
        if key not in self.where:
            key = self._find(module, key)
        with safe_open(str(self.where[key]), framework="pt") as f:
            w = f.get_tensor(key).double()
        return w.T if fan_in_fan_out else w

    def _find(self, module: str, key: str) -> str:
        """The stored key of ``module``'s weight when the names differ by leading parts: files may hold a model's
        inner names (``h.0...``) where the adapter names the whole model's (``transformer.h.0...``), or the reverse."""
        parts = key.split(".")
        for start in range(len(parts) - 1):
            tail = ".".join(parts[start:])
            found = [k for k in self.where if k == tail or k.endswith("." + tail)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                break
        raise ModaltuneError(f"base model {self.name} has no unambiguous weight for adapted module {module}; check "
                             "that it is the adapters' base model (--base names it)")


def _row_norm(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.norm(matrix, dim=1)


def _truncate(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Best rank-``rank`` approximation of ``B @ A`` from its factors; returns the new factors, the rank kept and
    the relative Frobenius error of the truncation."""
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return _split(qb @ u, s, vh @ qa.T, rank)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int):
    k = max(1, min(rank, int((s > s.max() * 1e-12).sum()) if s.numel() and s.max() > 0 else 1))
    total = float((s ** 2).sum())
    error = math.sqrt(float((s[k:] ** 2).sum()) / total) if total > 0 else 0.0
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k], k, error


def _dense_svd(delta: torch.Tensor, rank: int):
    """Best rank-``rank`` factors of a dense matrix; a randomised SVD for large ones (a 7B model's MLP matrices),
    with the truncation error taken from the whole matrix's norm, so it stays exact."""
    if min(delta.shape) <= 1024 or rank >= min(delta.shape) // 2:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return _split(u, s, vh, rank)
    u, s, v = torch.svd_lowrank(delta, q=min(rank + 16, min(delta.shape)), niter=6)
    B, A, k, _ = _split(u, s, v.T, rank)
    total = float((delta ** 2).sum())
    error = math.sqrt(max(total - float((s[:k] ** 2).sum()), 0.0) / total) if total > 0 else 0.0
    return B, A, k, error


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    keep = max(1, math.ceil(density * delta.numel()))
    if keep >= delta.numel():
        return delta
    threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
    return delta * (delta.abs() >= threshold)


@dataclasses.dataclass
class Combined:
    """A combination's adapter (config and tensors, written as a PEFT folder) and its report."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    report: dict[str, Any]


def combine(adapters: list[Adapter], weights: list[float], how: str = "cat", *, rank: int | None = None,
            density: float = 0.5, seed: int = 0, base: BaseWeights | None = None,
            dtype: torch.dtype = torch.float32) -> Combined:
    """Combine ``adapters`` with ``weights`` by ``how``; see the module docstring for what each method computes."""
    dora_out, fan = _check_inputs(adapters, weights, how, rank=rank, density=density, base=base)
    names = sorted({m for a in adapters for m in a.modules})
    out_tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    sq_err = sq_target = 0.0
    for name in names:
        parts = [(w, a.modules[name]) for w, a in zip(weights, adapters) if name in a.modules]
        W = _module_base(name, parts, base, fan, dora_out)
        c = [f.magnitude / _row_norm(W + f.scale * f.B @ f.A) if f.magnitude is not None else None for _, f in parts]
        deltas = [f.scale * f.B @ f.A if ci is None else ci[:, None] * (W + f.scale * f.B @ f.A) - W
                  for (_, f), ci in zip(parts, c)]
        target = sum(w * d for (w, _), d in zip(parts, deltas))
        if how in ("cat", "linear", "svd"):
            B, A, magnitude, result, truncation = _factor_combination(name, parts, c, W, how, rank)
        else:
            B, A, magnitude, result, truncation = _dense_combination(name, parts, deltas, how, rank=rank,
                                                                     density=density, seed=seed)
        err = float(torch.linalg.norm(result - target))
        norm = float(torch.linalg.norm(target))
        sq_err, sq_target = sq_err + err ** 2, sq_target + norm ** 2
        ranks[name] = A.shape[0]
        rows.append({"module": name, "rank": A.shape[0], "adapters": len(parts),
                     "relative_error": err / norm if norm > 0 else err, "truncation_error": truncation})
        out_tensors[f"{PREFIX}{name}.lora_A.weight"] = A.to(dtype).contiguous()
        out_tensors[f"{PREFIX}{name}.lora_B.weight"] = B.to(dtype).contiguous()
        if magnitude is not None:
            out_tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = magnitude.to(dtype).contiguous()
    use_dora = any(k.endswith("lora_magnitude_vector") for k in out_tensors)
    config = _combined_config(adapters, names, ranks, use_dora, base)
    report = {
        "how": how, "weights": list(weights), "density": density if how in ("ties", "dare") else None,
        "seed": seed if how == "dare" else None, "rank": rank,
        "adapters": [{"label": a.label, "folder": str(a.folder), "kind": a.kind, "modules": len(a.modules),
                      "ranks": sorted({f.A.shape[0] for f in a.modules.values()})} for a in adapters],
        "output": {"kind": adapter_kind({"use_dora": use_dora}), "modules": len(names),
                   "ranks": sorted(set(ranks.values())), "parameters": sum(t.numel() for t in out_tensors.values())},
        "relative_error": math.sqrt(sq_err / sq_target) if sq_target > 0 else math.sqrt(sq_err),
        "max_module_error": max(r["relative_error"] for r in rows),
        "max_truncation_error": max(r["truncation_error"] for r in rows),
        "modules": rows,
    }
    return Combined(config, out_tensors, report)


def _check_inputs(adapters: list[Adapter], weights: list[float], how: str, *, rank: int | None, density: float,
                  base: BaseWeights | None) -> tuple[bool, bool]:
    """Refuse a combination that cannot be computed; returns (the result is DoRA, the layers are fan-in-fan-out)."""
    if how not in HOW:
        raise ModaltuneError(f"unknown combination {how!r}; use one of {', '.join(HOW)}")
    if not adapters or len(weights) != len(adapters):
        raise ModaltuneError(f"give one weight per adapter ({len(adapters)} adapters, {len(weights)} weights)")
    if not 0.0 < density <= 1.0:
        raise ModaltuneError(f"density must be in (0, 1], got {density}")
    dora = any(f.magnitude is not None for a in adapters for f in a.modules.values())
    if dora and base is None:
        raise ModaltuneError("DoRA adapters need the base weights (their norms); pass --base MODEL")
    dora_out = dora and how in ("cat", "linear", "svd")
    if rank is not None and rank < 1:
        raise ModaltuneError(f"rank must be at least 1, got {rank}")
    fans = {bool(a.config.get("fan_in_fan_out")) for a in adapters}
    if len(fans) > 1:
        raise ModaltuneError("the adapters disagree on fan_in_fan_out (Conv1D-style and Linear-style layers): they "
                             "were trained on different model classes; combine adapters of one base model")
    return dora_out, fans.pop()


def _module_base(name: str, parts: list[tuple[float, Factors]], base: BaseWeights | None, fan: bool,
                 dora_out: bool) -> torch.Tensor | None:
    """The base weight of module ``name`` where the combination needs it (DoRA in or out), else None; refuses
    adapters whose shapes disagree with each other or with the base model."""
    shapes = {(f.B.shape[0], f.A.shape[1]) for _, f in parts}
    if len(shapes) > 1:
        raise ModaltuneError(f"module {name} has different shapes in the adapters ({sorted(shapes)}): they were "
                             "trained on different base models; combine adapters of one base model")
    # a DoRA result needs every module's magnitude (peft would start a missing one at ||W||), so every W
    W = base.weight(name, fan) if base is not None and (dora_out or any(f.magnitude is not None
                                                                         for _, f in parts)) else None
    if W is not None and tuple(W.shape) != next(iter(shapes)):
        raise ModaltuneError(f"base model {base.name}'s weight for {name} is {tuple(W.shape)}, the adapters' "
                             f"{next(iter(shapes))}: it is not their base model; pass the right one with --base")
    return W


def _factor_combination(name: str, parts: list[tuple[float, Factors]], c: list[torch.Tensor | None],
                        W: torch.Tensor | None, how: str, rank: int | None) -> tuple:
    """``cat``, ``linear`` or ``svd`` of one module's factors (``c``: each DoRA input's row scaling, None for
    LoRA); returns ``(B, A, magnitude or None, result delta, truncation error)``."""
    truncation, magnitude = 0.0, None
    d = torch.ones(parts[0][1].B.shape[0], dtype=torch.float64) + sum(w * (ci - 1.0) for (w, _), ci in zip(parts, c) if ci is not None)
    if W is not None and bool((d.abs() < 1e-6).any()):
        raise ModaltuneError(f"module {name}: the weighted DoRA magnitudes cancel (a row scaled by 0); "
                             "change the weights")
    rows_scale = [(ci / d if ci is not None else 1.0 / d) if W is not None else None for ci in c]
    if how == "linear":
        if len({f.A.shape[0] for _, f in parts}) > 1:
            raise ModaltuneError(f"linear mixes factors entry by entry and needs equal ranks; module {name} "
                                 f"has ranks {[f.A.shape[0] for _, f in parts]}; use cat or svd")
        B = sum(w * f.scale * f.B * (1 if g is None else g[:, None]) for (w, f), g in zip(parts, rows_scale))
        total = sum(abs(w) for w, _ in parts) or 1.0
        A = sum(abs(w) / total * f.A for w, f in parts)
    else:
        B = torch.cat([w * f.scale * f.B * (1 if g is None else g[:, None])
                       for (w, f), g in zip(parts, rows_scale)], dim=1)
        A = torch.cat([f.A for _, f in parts], dim=0)
        if how == "svd":
            B, A, _, truncation = _truncate(B, A, rank or max(f.A.shape[0] for _, f in parts))
    if W is not None:
        magnitude = d * _row_norm(W + B @ A)
        result = (magnitude / _row_norm(W + B @ A))[:, None] * (W + B @ A) - W
    else:
        result = B @ A
    return B, A, magnitude, result, truncation


def _dense_combination(name: str, parts: list[tuple[float, Factors]], deltas: list[torch.Tensor], how: str, *,
                       rank: int | None, density: float, seed: int) -> tuple:
    """``ties`` or ``dare`` of one module's dense deltas, then SVD to ``rank``; returns ``(B, A, None, result delta,
    truncation error)``. DARE's drop is seeded per module (``seed`` plus a hash of the module name)."""
    if how == "ties":
        trimmed = [w * _trim(dl, density) for (w, _), dl in zip(parts, deltas)]
        sign = torch.sign(sum(trimmed))
        agree = [(torch.sign(t) == sign) & (t != 0) for t in trimmed]
        merged = sum(t * g for t, g in zip(trimmed, agree)) / sum(g.double() for g in agree).clamp(min=1)
    else:
        gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        merged = sum(w * dl * (torch.rand(dl.shape, generator=gen, dtype=torch.float64) < density) / density
                     for (w, _), dl in zip(parts, deltas))
    B, A, _, truncation = _dense_svd(merged, rank or sum(f.A.shape[0] for _, f in parts))
    return B, A, None, B @ A, truncation


def _combined_config(adapters: list[Adapter], names: list[str], ranks: dict[str, int], use_dora: bool,
                     base: BaseWeights | None) -> dict[str, Any]:
    """The result's ``adapter_config.json``: the first input's, with scale 1 at every module's own rank."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n): r for n, r in ranks.items() if r != common}
    config = {**adapters[0].config, "r": common, "lora_alpha": common, "rank_pattern": pattern,
              "alpha_pattern": dict(pattern), "use_rslora": False, "use_dora": use_dora, "target_modules": names,
              "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None}
    if base is not None:
        config["base_model_name_or_path"] = base.name
    return config


def write_combined(combined: Combined, out: str | Path) -> Path:
    """Write the PEFT folder (``adapter_config.json``, ``adapter_model.safetensors``) and ``combine.json``/``.md``
    into ``out``; it is built beside ``out`` and moved into place, so a folder that exists is whole."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModaltuneError(f"--out {str(out)!r} is a file, not a folder; give a new folder")
    if out.exists() and any(out.iterdir()):
        raise ModaltuneError(f"{out} exists and is not empty; choose a new --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; the result is an ordinary folder
        atomic_write(tmp / "adapter_model.safetensors",
                     lambda f: save_file(combined.tensors, f, metadata={"format": "pt"}))
        atomic_write_json(tmp / "adapter_config.json", combined.config)
        atomic_write_json(tmp / "combine.json", combined.report)
        atomic_write_text(tmp / "combine.md", report_markdown(combined.report))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def report_markdown(report: dict[str, Any]) -> str:
    """The combination report as Markdown: inputs, method, output rank and distance from the weighted sum."""
    lines = [f"# Adapter combination: {report['how']}", "",
             "| adapter | weight | kind | modules | ranks |", "|---|---|---|---|---|"]
    for a, w in zip(report["adapters"], report["weights"]):
        lines.append(f"| {a['label']} | {w:g} | {a['kind']} | {a['modules']} | {a['ranks']} |")
    out = report["output"]
    lines += ["", f"Output: {out['kind']} adapter on {out['modules']} modules, ranks {out['ranks']}, "
              f"{out['parameters']:,} parameters."]
    if report.get("density") is not None:
        lines.append(f"Density {report['density']:g}" + (f", seed {report['seed']}." if report.get("seed") is not None
                                                          else "."))
    lines += ["", "Distance from the exact weighted sum of the adapters' weight changes (relative Frobenius norm): "
              f"{report['relative_error']:.3g} over all modules, {report['max_module_error']:.3g} at most in one "
              f"module; rank truncation alone: {report['max_truncation_error']:.3g} at most.", ""]
    worst = sorted(report["modules"], key=lambda r: -r["relative_error"])[:5]
    lines += ["| module (largest distance first) | rank | relative error | truncation |", "|---|---|---|---|"]
    lines += [f"| {r['module']} | {r['rank']} | {r['relative_error']:.3g} | {r['truncation_error']:.3g} |"
              for r in worst]
    return "\n".join(lines) + "\n"


def combine_folders(sources: list[str], out: str | Path, *, weights: list[float] | None = None, how: str = "cat",
                    rank: int | None = None, density: float = 0.5, seed: int = 0, base: str | None = None,
                    log: Callable[[str], None] = print) -> Combined:
    """Read the adapters ``sources`` names, combine them and write the result into ``out`` (``modaltune combine``)."""
    adapters = [read_adapter(s, label=s) for s in sources]
    bases = {a.config.get("base_model_name_or_path") for a in adapters} - {None}
    if len(bases) > 1 and not base:
        raise ModaltuneError(f"the adapters name different base models ({', '.join(sorted(bases))}); combine "
                             "adapters of one base model (give --base if they are the same model under two names)")
    weights = list(weights) if weights else [1.0] * len(adapters)
    if len(weights) == 1 and len(adapters) > 1:
        weights = weights * len(adapters)
    needs_base = any(f.magnitude is not None for a in adapters for f in a.modules.values())
    base_name = base or next((a.config.get("base_model_name_or_path") for a in adapters
                              if a.config.get("base_model_name_or_path")), None)
    if needs_base and not base_name:
        raise ModaltuneError("DoRA adapters need their base model's weights and these name none; pass --base MODEL")
    weights_source = BaseWeights(base_name, log=log) if needs_base else None
    combined = combine(adapters, weights, how, rank=rank, density=density, seed=seed, base=weights_source)
    if base:
        combined.config["base_model_name_or_path"] = base
    write_combined(combined, out)
    log(f"{how} of {len(adapters)} adapters -> {out} (ranks {combined.report['output']['ranks']}, relative distance "
        f"from the weighted sum {combined.report['relative_error']:.3g})")
    return combined
