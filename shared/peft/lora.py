"""LoRA and the variants that share its adapter: ``lora``, ``dora``, ``qlora`` and ``lora8bit``.

All components of one model that use LoRA share one PEFT ``LoraConfig``: the first component's rank, alpha and
dropout lead; the others' ranks and alphas go into ``rank_pattern``/``alpha_pattern``. ``qlora``/``lora8bit`` are
LoRA on a base loaded quantised (4-bit NF4 with double quantisation / LLM.int8, bitsandbytes); a merge rebuilds them
as plain LoRA on the full-precision base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from modaltune.shared.peft.base import PeftMethod, register_method
from modaltune.shared.peft.targets import all_targets, check_targets, targets_of

if TYPE_CHECKING:  # type hints only
    from modaltune.shared.peft.config import ComponentConfig, ComponentSpec


class Lora(PeftMethod):
    """Low-rank adapters on the target modules (PEFT ``LoraConfig``)."""

    name, help = "lora", "low-rank adapters on the target modules"
    lora_family = True
    adapter_kind = "lora"
    use_dora = False

    def validate(self, cfg: ComponentConfig, where: str) -> None:
        check_targets(cfg, where)

    def peft_config(self, model: nn.Module, specs: list[ComponentSpec]) -> Any:
        import peft  # lazy: peft is imported when a model is built, not when a config is read

        targets = all_targets(model, specs)
        first = specs[0].config
        rank_pattern = {}
        alpha_pattern = {}
        for spec in specs[1:]:
            for t in targets_of(model, spec):
                rank_pattern[t] = spec.config.r
                alpha_pattern[t] = spec.config.alpha
        return peft.LoraConfig(
            r=first.r,
            lora_alpha=first.alpha,
            lora_dropout=first.dropout,
            target_modules=targets,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            use_dora=self.use_dora,
            bias="none",
        )


class Dora(Lora):
    """Weight-decomposed LoRA (PEFT ``use_dora``): a direction by LoRA, a learned magnitude per output row."""

    name, help, adapter_kind, use_dora = "dora", "weight-decomposed LoRA (use_dora)", "dora", True


class QuantisedLora(Lora):
    """LoRA on a base model loaded quantised; a merge rebuilds it as plain LoRA on the full-precision base."""

    def __init__(self, name: str, quantised: str, help: str) -> None:
        self.name, self.quantised, self.help = name, quantised, help

    def merge_substitute(self, where: str) -> str:
        return "lora"


def adapter_kind(config: dict) -> str:
    """The kind of a PEFT LoRA adapter from its ``adapter_config.json``: ``dora``, ``rslora`` or ``lora``.

    Example:
        >>> adapter_kind({"use_dora": True}), adapter_kind({"use_rslora": True}), adapter_kind({})
        ('dora', 'rslora', 'lora')
    """
    if config.get("use_dora"):
        return Dora.name
    return "rslora" if config.get("use_rslora") else Lora.name


register_method(Lora())
register_method(Dora())
register_method(QuantisedLora("qlora", "4bit", "LoRA on a 4-bit NF4 base with double quantisation (bitsandbytes; "
                                               "the model is loaded so)"))
register_method(QuantisedLora("lora8bit", "8bit", "LoRA on an 8-bit (LLM.int8) base"))
