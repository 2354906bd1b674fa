"""A component's tuning config (:class:`ComponentConfig`) and the component it applies to (:class:`ComponentSpec`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from modaltune.shared.config import CROSS_CHECKS, doc
from modaltune.shared.errors import ConfigError
from modaltune.shared.peft.base import get_method, known_methods, method_of
from modaltune.shared.peft.docs import method_help


class _RegistryHelp(dict):
    """A field's metadata whose ``help`` is generated from the method registry when it is read, so ``--help``
    lists the methods plugins registered too."""

    def __getitem__(self, key: str) -> Any:
        return method_help() if key == "help" else super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        return method_help() if key == "help" else super().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key == "help" or super().__contains__(key)


@dataclasses.dataclass
class ComponentConfig:
    """How one component is tuned."""

    # a registered method's name, checked against the registry (plugins can add names), not a Literal
    method: str = dataclasses.field(default="frozen", metadata=_RegistryHelp())
    lr: float | None = doc(None, "learning rate for this component (null: train.lr)")
    r: int = doc(16, "LoRA rank")
    alpha: float = doc(32.0, "LoRA alpha (scale = alpha / r)")
    dropout: float = doc(0.05, "LoRA dropout")
    targets: list[str] = doc(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module-path patterns (relative to the component) that get adapters",
    )
    feedforward: list[str] = doc(["gate_proj", "up_proj", "down_proj"], "IA3: which targets are feed-forward layers")
    num_virtual_tokens: int = doc(20, "prompt/prefix tuning: number of virtual tokens")
    prompt_init_text: str | None = doc(None, "prompt tuning: initialise virtual tokens from this text")
    quantize_head: bool = doc(False, "qlora/lora8bit: also quantise the output head (off: it stays in full precision)")
    eval_ranks: list[int] | None = doc(None, "dylora: ranks the adapter is evaluated at after training (null: the "
                                             "powers of 2 from 2 below r)")
    layers: list[int] | None = doc(
        None, "only these blocks of the component get the method (0-based; negative counts from the top, "
              "[-1] = top block); null: all")

    def validate(self, where: str) -> None:
        method = get_method(self.method, f"{where}.method")
        if self.r < 1:
            raise ConfigError(f"{where}.r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout}")
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"{where}.num_virtual_tokens must be at least 1")
        if self.layers is not None and not self.layers:
            raise ConfigError(f"{where}.layers is empty: list block indices (e.g. [-1]) or use null for all")
        for other in known_methods():  # a field another method owns, set here: refused, naming its owner
            for name in other.own_fields:
                if other is not method and name not in method.own_fields and getattr(self, name) is not None:
                    raise ConfigError(f"{where}.{name} applies to method {other.name} only ({where}.method is "
                                      f"{self.method}); remove it or set {where}.method={other.name}")
        method.validate(self, where)

    @property
    def trains(self) -> bool:
        return method_of(self).trains


@dataclasses.dataclass
class ComponentSpec:
    """A component of one transformers model: its name, root module path and tuning config."""

    name: str
    root: str
    config: ComponentConfig


def _methods_check_optimizer(cfg: Any) -> None:
    """Each component's method may refuse the config's ``train.optimizer`` (e.g. MeZO with DyLoRA)."""
    optimizer = getattr(getattr(cfg, "train", None), "optimizer", None)
    if optimizer is None or not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, ComponentConfig):
            method_of(value).check_optimizer(optimizer, f.name)


CROSS_CHECKS.append(_methods_check_optimizer)
