"""IA3 (``method: ia3``): learned rescaling vectors on the target modules (PEFT ``IA3Config``)."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

from torch import nn

from modaltune.shared.peft.base import PeftMethod, register_method
from modaltune.shared.peft.targets import all_targets, check_targets, targets_of

if TYPE_CHECKING:  # type hints only
    from modaltune.shared.peft.config import ComponentConfig, ComponentSpec


class IA3(PeftMethod):
    """Rescaling vectors on the targets; ``feedforward`` says which targets scale their input, not output."""

    name, help, adapter_kind = "ia3", "learned rescaling vectors on the target modules", "ia3"

    def validate(self, cfg: ComponentConfig, where: str) -> None:
        check_targets(cfg, where)

    def peft_config(self, model: nn.Module, specs: list[ComponentSpec]) -> Any:
        import peft  # lazy: peft is imported when a model is built, not when a config is read

        targets = all_targets(model, specs)
        ff: list[str] = []
        for spec in specs:
            ff += [t for t in targets_of(model, spec) if any(fnmatch.fnmatchcase(t, "*" + p)
                                                             for p in spec.config.feedforward)]
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff)


register_method(IA3())
