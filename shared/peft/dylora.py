"""DyLoRA (``method: dylora``): one LoRA adapter trained for every rank up to ``r`` at once.

Each optimizer step draws a rank ``b`` (uniformly from 1..r, seeded by the run's seed and the step, so a resumed run
draws the same) and trains the adapter truncated to it: the first ``b`` rows of ``A`` and columns of ``B`` at scale
``alpha / b``, as in the DyLoRA paper (Valipour et al., 2023). The lower ranks' rows are shared by every larger rank,
so after one run the adapter can be used at any rank ``b <= r`` by keeping its first ``b`` ranks.

The layers stay peft's own LoRA layers: a forward hook on each ``lora_A`` zeroes the ranks above ``b`` and the layer's
``scaling`` is set to ``alpha / b``; between steps (evaluation, saving) the adapter is at its full rank. A checkpoint
is a plain rank-``r`` LoRA; :func:`export_rank` writes the rank-``b`` adapter as a plain PEFT folder.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.io import atomic_write, atomic_write_json
from modaltune.shared.peft.base import MethodState, register_method
from modaltune.shared.peft.lora import Lora

if TYPE_CHECKING:  # type hints only
    from modaltune.shared.peft.config import ComponentConfig, ComponentSpec

class DyLoRA(Lora):
    """LoRA trained at a rank drawn per step (:class:`NestedRanks`), usable at any rank up to ``r`` afterwards."""

    name, adapter_kind = "dylora", "dylora"  # its rank controller acts on every LoRA layer of a model: shares none
    help = ("DyLoRA: LoRA trained at a rank drawn per step (1..r, lower ranks shared), so it can be used at any rank "
            "up to r afterwards")
    own_fields = ("eval_ranks",)

    def validate(self, cfg: ComponentConfig, where: str) -> None:
        super().validate(cfg, where)
        if cfg.eval_ranks is not None:
            bad = [b for b in cfg.eval_ranks if not 1 <= b <= cfg.r]
            if bad:
                raise ConfigError(f"{where}.eval_ranks {bad} are outside 1..{cfg.r} (the adapter's rank, {where}.r)")

    def check_optimizer(self, optimizer: str, where: str) -> None:
        if optimizer == "mezo":  # MeZO moves every trainable weight along its perturbation, masked ranks included
            raise ConfigError(f"train.optimizer=mezo with {where}.method=dylora: MeZO's update would move the "
                              f"ranks a step does not use; train DyLoRA with adamw, or use {where}.method=lora")

    def mark(self, base: torch.nn.Module, specs: list[ComponentSpec]) -> list[str]:
        return [s.root for s in specs]  # the rank each step trains is set by NestedRanks

    def attach(self, model: torch.nn.Module, marks: list) -> NestedRanks | None:
        """The DyLoRA controller of ``model``'s dylora components (None when it has none)."""
        from peft.tuners.lora import LoraLayer  # lazy: peft is imported when a model is built

        layers = []
        for path, roots in marks:
            for root in roots:
                prefix = ".".join(x for x in (path, root) if x)
                layers += [m for name, m in model.named_modules() if isinstance(m, LoraLayer)
                           and "default" in m.lora_A and (not prefix or name.startswith(prefix + "."))]
        return NestedRanks(layers) if layers else None


class _RankMask:
    """A forward hook on ``lora_A``: zeroes its outputs above rank ``k`` (nothing to do at full rank)."""

    def __init__(self, r: int) -> None:
        self.r = self.k = r
        self._masks: dict[tuple, torch.Tensor] = {}  # (k, device, dtype) -> mask, made once where it is used

    def __call__(self, _module, _inputs, out: torch.Tensor) -> torch.Tensor:
        if self.k >= self.r:
            return out
        key = (self.k, out.device, out.dtype)
        if key not in self._masks:
            self._masks[key] = (torch.arange(self.r, device=out.device) < self.k).to(out.dtype)
        return out * self._masks[key]


class NestedRanks(MethodState):
    """The rank every DyLoRA layer of a model runs at (:meth:`set_rank`), and the seeded draw per step: the dylora
    state of a ModaltuneModel (``model.peft_state("dylora")``)."""

    def __init__(self, layers: list[torch.nn.Module], adapter: str = "default") -> None:
        self.layers = layers
        self.adapter = adapter
        self.rank = max(layer.r[adapter] for layer in layers)
        self.max_rank = self.rank
        self.masks = {id(layer): _RankMask(layer.r[adapter]) for layer in layers}
        self._hooks = [layer.lora_A[adapter].register_forward_hook(self.masks[id(layer)]) for layer in layers]

    def remove(self) -> None:
        """Take the hooks off (the layers are plain LoRA layers again, at their full rank)."""
        self.set_rank(self.max_rank)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def set_rank(self, b: int) -> None:
        """Run every layer at rank ``b`` (its own rank when smaller): ranks above masked, scale alpha / b."""
        if not 1 <= b <= self.max_rank:
            raise ModaltuneError(f"DyLoRA rank {b} is outside 1..{self.max_rank} (the adapter's r)")
        for layer in self.layers:
            k = min(b, layer.r[self.adapter])
            self.masks[id(layer)].k = k
            layer.scaling[self.adapter] = layer.lora_alpha[self.adapter] / k
        self.rank = b

    @contextlib.contextmanager
    def at(self, b: int) -> Iterator[None]:
        """The model at rank ``b`` inside the block, at its full rank after."""
        self.set_rank(b)
        try:
            yield
        finally:
            self.set_rank(self.max_rank)

    def draw(self, seed: int, step: int) -> int:
        """The rank trained at ``step`` (uniform over 1..r; the same on a rerun or resume)."""
        return random.Random(f"{seed}:{step}").randint(1, self.max_rank)

    def counts(self, seed: int, steps: int) -> dict[int, int]:
        """How often each rank was trained in steps ``0..steps-1`` (a resumed run's earlier steps included)."""
        return dict(sorted(Counter(self.draw(seed, s) for s in range(steps)).items()))

    def callbacks(self, seed: int) -> list:
        return [NestedRankCallback(self, seed)]

    def check_optimizer(self, optimizer: str) -> None:
        if optimizer == "mezo":
            raise ConfigError("train.optimizer=mezo with a dylora component: MeZO's update would move the ranks "
                              "a step does not use; train DyLoRA with adamw, or use lora with mezo")

    def summary(self, drawn: dict[str, dict], seed: int, steps: int) -> dict[str, Any]:
        return {"dylora_ranks_drawn": self.counts(seed, steps)}


class NestedRankCallback(TrainerCallback):
    """Draws each optimizer step's rank before it and restores the full rank after it."""

    def __init__(self, nested: NestedRanks, seed: int) -> None:
        self.nested, self.seed = nested, seed

    def on_step_begin(self, args, state, control, **kwargs):
        self.nested.set_rank(self.nested.draw(self.seed, state.global_step))

    def on_step_end(self, args, state, control, **kwargs):
        self.nested.set_rank(self.nested.max_rank)

    def on_train_end(self, args, state, control, **kwargs):
        self.nested.set_rank(self.nested.max_rank)

    def counts(self, steps: int) -> dict[int, int]:
        """How often each rank was trained in steps ``0..steps-1`` (a resumed run's earlier steps included)."""
        return self.nested.counts(self.seed, steps)


def eval_ranks(max_rank: int, wanted: list[int] | None) -> list[int]:
    """The ranks a DyLoRA adapter is evaluated at: ``wanted`` (each within 1..r), or the powers of 2 below r."""
    if wanted:
        bad = [b for b in wanted if not 1 <= b <= max_rank]
        if bad:
            raise ModaltuneError(f"eval_ranks {bad} are outside 1..{max_rank} (the adapter's r)")
        return sorted(set(wanted))
    return [2 ** i for i in range(max_rank.bit_length()) if 2 ** i < max_rank and 2 ** i >= 2]


def export_rank(folder: str | Path, b: int, out: str | Path) -> Path:
    """Write the rank-``b`` part of a DyLoRA-trained PEFT adapter ``folder`` (its first ``b`` ranks, at scale
    alpha / b) into ``out`` as a plain PEFT LoRA folder."""
    folder, out = Path(folder), Path(out)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise ModaltuneError(f"{folder}: a DyLoRA adapter has one rank and alpha and no DoRA; this one does not")
    if not 1 <= b <= int(config["r"]):
        raise ModaltuneError(f"rank {b} is outside 1..{config['r']} (the adapter's r)")
    tensors = {}
    for key, t in load_file(str(folder / "adapter_model.safetensors")).items():
        tensors[key] = (t[:b] if ".lora_A." in key else t[:, :b] if ".lora_B." in key else t).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(out / "adapter_config.json", {**config, "r": b})
    return out


def measure_ranks(model, wanted: list[int] | None, measure, checkpoint: Path, run_dir: Path,
                  log=print) -> dict[str, dict]:
    """A DyLoRA model measured at each evaluation rank: ``{"after_rB": metrics}``; each rank's adapters are also
    written as plain PEFT folders to ``run_dir/adapters/rB/COMPONENT``. Empty for a model without DyLoRA."""
    nested = model.peft_state(DyLoRA.name)
    if nested is None:
        return {}
    columns = {}
    for b in eval_ranks(nested.max_rank, wanted):
        with nested.at(b):
            columns[f"after_r{b}"] = measure(f"rank {b}")[0]
        for folder in sorted((Path(checkpoint) / "adapter").glob("*/adapter_config.json")):
            export_rank(folder.parent, b, run_dir / "adapters" / f"r{b}" / folder.parent.name)
        log(f"rank {b}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(columns[f'after_r{b}'].items())))
    return columns


register_method(DyLoRA())
