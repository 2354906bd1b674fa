"""The method lists of ``--help``, the docs and the YAML comments, generated from the registry.

``tests/test_peft_registry.py`` compares every place that lists methods with these texts, so a method that is
registered but not listed (or listed but gone) fails it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable

from modaltune.shared.peft.base import PeftMethod, registered_methods

# Which methods a component accepts, by where it sits (the YAML comments list these):
SCOPES: dict[str, Callable[[PeftMethod], bool]] = {
    "any": lambda m: True,
    "trains": lambda m: m.trains,  # a causal LM trained on its own (frozen would train nothing)
    "spliced": lambda m: not m.virtual_tokens,  # a part of a composed model or of Whisper (no virtual tokens)
    "encoder": lambda m: not m.virtual_tokens and not m.quantised,  # an encoder of a composed model (never quantised)
    "weights_or_adapters": lambda m: m.trains and not m.virtual_tokens,  # preference training
    "lora": lambda m: m.lora_family,  # adapters that can be combined
}


def method_choices(scope: str = "any") -> str:
    """``frozen | full | ...``: the registered methods a component in ``scope`` (a key of :data:`SCOPES`) accepts,
    in registration order; a YAML ``method:`` comment starts with it.

    Example:
        >>> method_choices("lora").split(" | ")[:2]
        ['lora', 'dora']
    """
    accepts = SCOPES[scope]
    return " | ".join(m.name for m in registered_methods() if accepts(m))


def method_help() -> str:
    """The ``method`` field's ``--help`` line."""
    return f"PEFT method, one of the registered ones (a plugin can add more): {method_choices()}"


def method_table() -> str:
    """The reStructuredText table of every method and its help (the :mod:`modaltune.shared.peft` docstring)."""
    methods = registered_methods()
    width = max(len(m.name) for m in methods) + 4
    rule = "=" * width + "  " + "=" * 90
    rows = [rule]
    for m in methods:
        lines = textwrap.wrap(m.help, 90) or [""]
        rows.append(f"{'``' + m.name + '``':<{width}}  {lines[0]}".rstrip())
        rows += [" " * (width + 2) + line for line in lines[1:]]
    rows.append(rule)
    return "\n".join(rows)


def method_markdown() -> str:
    """The method list of ``docs/cli.md``: one bullet per method with its help."""
    return "\n".join(f"  - `{m.name}`: {m.help}" for m in registered_methods())
