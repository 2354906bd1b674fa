"""Applying the components' methods to one transformers model (:func:`apply_peft`)."""

from __future__ import annotations

from torch import nn

from modaltune.shared.errors import ConfigError
from modaltune.shared.peft.base import MARKS, get_method, method_of
from modaltune.shared.peft.config import ComponentSpec


def apply_peft(model: nn.Module, specs: list[ComponentSpec], *, causal_lm: bool = True) -> nn.Module:
    """Apply each component's method to ``model`` (one transformers model) and return the model to train.

    Adapter methods wrap ``model`` in a ``peft.PeftModel`` (the first adapter component's method builds it); then
    each method marks the weights it trains (``full`` and ``hft`` unfreeze theirs) and records, on the transformers
    model, what its training hooks need later (:meth:`PeftMethod.mark`, read back by ``ModaltuneModel``). ``frozen``
    components stay frozen. All components of one model that use adapters must share one adapter kind (LoRA with
    DoRA on one and plain LoRA on another is refused).
    """
    by_method: dict[str, list[ComponentSpec]] = {}
    for spec in specs:
        by_method.setdefault(spec.config.method, []).append(spec)
    adapter_specs = [s for s in specs if method_of(s.config).adapter_kind is not None]
    adapter_kinds = {method_of(s.config).adapter_kind for s in adapter_specs}
    if len(adapter_kinds) > 1:
        names = ", ".join(f"{s.name}={s.config.method}" for s in adapter_specs)
        raise ConfigError(
            f"one model can carry one adapter type, but its components ask for several ({names}); "
            "use the same method for them (e.g. all lora) or make some full/frozen"
        )
    for param in model.parameters():
        param.requires_grad_(False)

    if adapter_specs:
        model = method_of(adapter_specs[0].config).wrap(model, adapter_specs, causal_lm=causal_lm)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    marks = {}
    for name, group in by_method.items():
        found = get_method(name).mark(base, group)
        if found is not None:
            marks[name] = found
    if marks:  # read back by ModaltuneModel.record_trained (its own attribute: peft wrappers forward getattr inward)
        setattr(base, MARKS, {**vars(base).get(MARKS, {}), **marks})
    return model
