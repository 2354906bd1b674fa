"""LoRA-FA (``method: lora_fa``): LoRA whose ``A`` stays at its initialisation.

``B`` trains with peft's LoRA-FA optimizer (its gradient projected onto ``A``'s row space), so neither ``A``'s
gradients nor their optimizer state exist. ``A`` is still a trained weight: checkpoints save it with the adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from modaltune.shared.peft.base import MethodState, register_method
from modaltune.shared.peft.lora import Lora

if TYPE_CHECKING:  # type hints only
    from modaltune.shared.peft.config import ComponentSpec


class LoraFA(Lora):
    """LoRA with ``A`` fixed (saved, never trained) and ``B`` trained by the LoRA-FA optimizer."""

    name, adapter_kind = "lora_fa", "lora_fa"  # its optimizer acts on every LoRA layer of a model: shares no adapter
    help = ("LoRA-FA: LoRA whose A stays at its initialisation; B trains with peft's LoRA-FA optimizer, so A has no "
            "gradients or optimizer state")

    def mark(self, base: nn.Module, specs: list[ComponentSpec]) -> list[str]:
        return [s.root for s in specs]  # A is saved with the adapter but never trained (attach)

    def attach(self, model: nn.Module, marks: list[tuple[str, Any]]) -> MethodState | None:
        roots = [".".join(x for x in (path, root) if x) for path, found in marks for root in found]
        fixed = {n for n in model.trained_names if ".lora_A." in n
                 and any(not r or n.startswith(r + ".") for r in roots)}
        return FixedFactors(fixed) if fixed else None


def lora_scale(model: nn.Module, param_name: str) -> float:
    """The LoRA scale (alpha / r, or alpha / sqrt(r) for rsLoRA) of the layer a ``lora_A``/``lora_B`` weight is in."""
    layer, _, rest = param_name.rpartition(".lora_")
    return float(model.get_submodule(layer).scaling[rest.split(".")[1]])


class FixedFactors(MethodState):
    """LoRA-FA's fixed ``A`` matrices of a model, and the optimizer that takes each just before its ``B``."""

    restricts_stages = True
    owns_optimizer = True

    def __init__(self, fixed: set[str]) -> None:
        self.fixed = frozenset(fixed)

    def group_keys(self) -> dict[str, list]:
        return {"names": [], "scaling_factors": []}

    def add_param(self, group: dict, model: nn.Module, name: str, param: nn.Parameter, params: dict) -> None:
        partner = name.replace(".lora_B.", ".lora_A.")
        if partner in self.fixed:  # the optimizer takes each fixed A just before its B
            scale = lora_scale(model, name)
            group["params"] += [params[partner], param]
            group["names"] += [partner, name]
            group["scaling_factors"] += [scale, scale]
        else:
            group["params"].append(param)
            group["names"].append(name)
            group["scaling_factors"].append(None)

    def build_optimizer(self, groups: list[dict], args: Any) -> Any:
        from peft.optimizers.lorafa import LoraFAOptimizer  # lazy: peft is imported when a model trains

        return LoraFAOptimizer(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


register_method(LoraFA())
