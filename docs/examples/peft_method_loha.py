"""A new PEFT method in one module: LoHa (low-rank Hadamard product adapters, peft's ``LoHaConfig``).

Importing this module registers ``method: loha``; from then on every recipe accepts ``llm.method=loha`` (and
``decoder.method=loha`` ...), ``--help`` and ``modaltune config --keys`` list it, and checkpoints, resume and
``modaltune generate`` work as for LoRA. To ship it in your own package, name this module in your package's
``modaltune.plugins`` entry point (see docs/extending.md); tests/test_peft_registry.py runs this file.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from modaltune.shared.errors import ConfigError
from modaltune.shared.peft import ComponentConfig, ComponentSpec, PeftMethod, register_method, targets_of


class LoHa(PeftMethod):
    """``W + (B1 A1) * (B2 A2)``: two rank-``r`` products multiplied entry by entry (Hyeon-Woo et al., 2022)."""

    name = "loha"
    help = "LoHa: low-rank Hadamard product adapters on the target modules (peft LoHaConfig)"
    adapter_kind = "loha"  # the PEFT adapter it wraps the model in; a model's adapter components share one kind

    def validate(self, cfg: ComponentConfig, where: str) -> None:
        if not cfg.targets:
            raise ConfigError(f"{where}.targets is empty: loha needs at least one module pattern")

    def peft_config(self, model: nn.Module, specs: list[ComponentSpec]) -> Any:
        import peft

        first, rank_pattern, alpha_pattern = specs[0].config, {}, {}
        for spec in specs[1:]:  # other components of the same model keep their own rank and alpha
            for target in targets_of(model, spec):
                rank_pattern[target], alpha_pattern[target] = spec.config.r, spec.config.alpha
        return peft.LoHaConfig(r=first.r, alpha=first.alpha, module_dropout=first.dropout,
                               target_modules=[t for spec in specs for t in targets_of(model, spec)],
                               rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


register_method(LoHa())
