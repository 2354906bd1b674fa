"""What a PEFT method is (:class:`PeftMethod`), the per-model state it keeps (:class:`MethodState`), and the loud
registry every method is looked up in.

A method is one object holding everything it does: its one-line help, its config checks, how it is applied to a
component, which parameters count as trained, what it needs quantised, how a merge rebuilds it, and its training
hooks. Nothing outside :mod:`modaltune.shared.peft` names a method; it asks the method's object
(``method_of(cfg).virtual_tokens``, ``.quantised``, ...).

A plugin adds a method by registering an instance (``register_method(LoHa())``) in the module its
``modaltune.plugins`` entry point names; :func:`get_method` loads the plugins before it calls a name unknown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from modaltune.shared.errors import ConfigError, ModaltuneError, suggest
from modaltune.shared.registry import load_plugins

if TYPE_CHECKING:  # type hints only: config.py imports this module
    from modaltune.shared.peft.config import ComponentConfig, ComponentSpec

MARKS = "_modaltune_peft"  # on a transformers model: {method name: [what its mark() returned, per apply_peft]}


class MethodState:
    """What a method keeps on one :class:`~modaltune.shared.model.ModaltuneModel` once its trained weights are
    recorded, and its hooks into training. Every hook is a no-op here; a method overrides those it needs."""

    fixed: frozenset[str] = frozenset()  # trained parameters that never get gradients (saved, not optimised)
    restricts_stages: bool = False  # it changes what a stage trains (a draw, fixed weights): set up a stage at once
    owns_optimizer: bool = False  # it builds the optimizer (group_keys / add_param / build_optimizer)

    def remove(self) -> None:
        """Undo what the state did to the model (hooks); called before the trained weights are recorded again."""

    def stage_draw(self, model: nn.Module, allowed: set[str] | None, draw: str) -> dict[str, tuple[set[str], dict]]:
        """``{component: (parameter names that train this stage, summary)}`` for a method that trains a drawn part
        of its components (``draw`` seeds it); empty for the others."""
        return {}

    def callbacks(self, seed: int) -> list:
        """Trainer callbacks a stage runs with (e.g. a rank drawn per step)."""
        return []

    def check_optimizer(self, optimizer: str) -> None:
        """Raise ConfigError when this model cannot train with ``train.optimizer``."""

    def summary(self, drawn: dict[str, dict], seed: int, steps: int) -> dict[str, Any]:
        """Entries of a stage's summary (``stages.json``); ``drawn`` is what the stage's draw reported."""
        return {}

    def group_keys(self) -> dict[str, list]:
        """Extra keys of every optimizer group (fresh lists), when :attr:`owns_optimizer`."""
        return {}

    def add_param(self, group: dict, model: nn.Module, name: str, param: nn.Parameter, params: dict) -> None:
        """Put a trainable parameter into its optimizer group, when :attr:`owns_optimizer`."""
        group["params"].append(param)

    def build_optimizer(self, groups: list[dict], args: Any) -> Any:
        """The optimizer over ``groups`` (``args``: the Trainer's arguments), when :attr:`owns_optimizer`."""
        raise NotImplementedError


class PeftMethod:
    """One PEFT method. Subclasses set the class attributes and override the hooks they need.

    Public read-only attributes (other modules ask these instead of naming methods):

    - ``name``: the config value (``llm.method=NAME``); ``help``: one line for ``--help``, the docs and YAML;
    - ``trains``: it trains something (every method but ``frozen``);
    - ``full_weights``: every weight of the component trains, its buffers are saved and it runs in train mode;
    - ``virtual_tokens``: it prepends trainable tokens (causal LMs only; nothing to merge);
    - ``quantised``: ``"4bit"``/``"8bit"`` when the base model is loaded quantised for it, else None;
    - ``lora_family``: its adapter is a LoRA adapter (PEFT ``LoraConfig``), so it can be combined;
    - ``adapter_kind``: the PEFT adapter type it wraps the model in (None: it trains the model's own weights);
      the components of one model that use adapters must share one kind;
    - ``own_fields``: ComponentConfig fields only this method reads (another method given one is refused).
    """

    name: str = ""
    help: str = ""
    trains: bool = True
    full_weights: bool = False
    virtual_tokens: bool = False
    quantised: str | None = None
    lora_family: bool = False
    adapter_kind: str | None = None
    own_fields: tuple[str, ...] = ()

    def validate(self, cfg: ComponentConfig, where: str) -> None:
        """Method-specific checks of a component's config (``where``: its section, e.g. ``llm``)."""

    def check_optimizer(self, optimizer: str, where: str) -> None:
        """Raise ConfigError when a config trains this component with ``train.optimizer`` it cannot use."""

    def merge_substitute(self, where: str) -> str:
        """The method a merge rebuilds the component with (adapters merge into a full-precision base)."""
        return self.name

    def prepare(self, model: nn.Module, cfg: ComponentConfig, path: str) -> None:
        """Called on a freshly loaded transformers model (from folder ``path``) before :func:`apply_peft`."""

    def peft_config(self, model: nn.Module, specs: list[ComponentSpec]) -> Any:
        """The PEFT config of one adapter over ``specs`` (all of this method's adapter kind; the first leads)."""
        raise NotImplementedError(f"method {self.name!r} has no adapter")

    def wrap(self, model: nn.Module, specs: list[ComponentSpec], *, causal_lm: bool) -> nn.Module:
        """``model`` wrapped in its PEFT adapter for ``specs`` (the components of this adapter kind)."""
        import peft  # lazy: peft is imported when a model is built, not when a config is read

        config = self.peft_config(model, specs)
        if any(method_of(s.config).quantised for s in specs):
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return peft.get_peft_model(model, config)

    def mark(self, base: nn.Module, specs: list[ComponentSpec]) -> Any:
        """After wrapping: unfreeze the weights this method trains in ``base`` (the transformers model inside any
        wrapper) and return what :meth:`attach` needs later (None: nothing). ``specs`` use this method."""
        return None

    def attach(self, model: nn.Module, marks: list[tuple[str, Any]]) -> MethodState | None:
        """The method's state on a ModaltuneModel whose trained weights are being recorded: ``marks`` holds
        ``(path of the marked module in model, what mark() returned)`` for each model this method marked."""
        return None


_METHODS: dict[str, PeftMethod] = {}
_OWNERS: dict[str, str] = {}


def register_method(method: PeftMethod, *, owner: str | None = None) -> PeftMethod:
    """Add ``method`` to the registry under ``method.name``; a name registered twice is an error naming both owners.

    Example:
        >>> class Nothing(PeftMethod):
        ...     name, help, trains = "nothing_example", "trains nothing", False
        >>> get_method(register_method(Nothing()).name).help
        'trains nothing'
        >>> register_method(Nothing())
        Traceback (most recent call last):
        ...
        modaltune.shared.errors.ModaltuneError: PEFT method 'nothing_example' is registered twice: ...
        >>> unregister_method("nothing_example")
    """
    who = owner or f"{type(method).__module__}.{type(method).__qualname__}"
    if not method.name or not method.help:
        raise ModaltuneError(f"PEFT method {who} needs a name and a one-line help")
    if method.name in _METHODS:
        raise ModaltuneError(f"PEFT method {method.name!r} is registered twice: by {_OWNERS[method.name]} and by "
                             f"{who}; rename one of them")
    _METHODS[method.name] = method
    _OWNERS[method.name] = who
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (tests and examples that register one for a while)."""
    _METHODS.pop(name, None)
    _OWNERS.pop(name, None)


def get_method(name: str, where: str = "method") -> PeftMethod:
    """The method registered as ``name`` (plugins are loaded first when it is not a built-in one).

    Raises:
        ConfigError: no such method; the message lists the known ones, with a "did you mean".
    """
    if name not in _METHODS:
        load_plugins()
    if name not in _METHODS:
        raise ConfigError(f"{where}: unknown PEFT method {name!r}{suggest(str(name), _METHODS)}; known: "
                          f"{', '.join(_METHODS)}")
    return _METHODS[name]


def method_of(cfg: ComponentConfig) -> PeftMethod:
    """The method object of a component's config."""
    return get_method(cfg.method)


def method_owner(name: str) -> str:
    """Where method ``name`` was registered from."""
    get_method(name)
    return _OWNERS[name]


def method_names() -> list[str]:
    """Every registered method's name, in registration order (plugins included)."""
    load_plugins()
    return list(_METHODS)


def registered_methods() -> list[PeftMethod]:
    """Every registered method, in registration order (plugins included)."""
    load_plugins()
    return list(_METHODS.values())


def known_methods() -> list[PeftMethod]:
    """The methods registered so far, without loading plugins (for checks that run while a config loads)."""
    return list(_METHODS.values())


def registry_position(name: str) -> int:
    """A method's position in the registry (method states run in this order)."""
    return list(_METHODS).index(name) if name in _METHODS else len(_METHODS)
