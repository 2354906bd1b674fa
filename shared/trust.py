"""The trust-remote-code guard: a checkpoint is data from someone else, so it cannot turn on code execution.

Every command that rebuilds a model from a checkpoint's own config (``eval``, ``merge``, ``generate``) reads that
config through :func:`checkpoint_config`, which refuses a code-running flag (``trust_remote_code``) the checkpoint
sets unless the user running the command sets it too.
"""

from __future__ import annotations

from typing import Any

from modaltune.shared.config import apply_dotted, from_dict, parse_overrides
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.recipe import Recipe

CODE_FLAGS = ("trust_remote_code",)  # config keys that let a model folder run its own code


def _code_flags(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of every code-running flag set anywhere in a nested config mapping."""
    found: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            if key in CODE_FLAGS and value:
                found[dotted] = data.get("name", value)
            found.update(_code_flags(value, dotted + "."))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.update(_code_flags(value, f"{prefix[:-1]}[{i}]."))
    return found


def checkpoint_config(recipe: Recipe, meta: dict[str, Any], overrides: list[str] | None, checkpoint: str) -> Any:
    """The config a checkpoint was trained with, made safe to rebuild the model from, plus command-line overrides.

    A checkpoint is data from someone else: a flag in it that lets a model folder run its own code
    (``trust_remote_code``) is refused unless the user running the command sets it too.

    Raises:
        ModaltuneError: the checkpoint asks for remote code and the command line does not.
    """
    given = parse_overrides(overrides or [])
    asked = _code_flags(meta.get("config") or {})
    refused = {key: model for key, model in asked.items() if given.get(key) is not True}
    if refused:
        keys = " ".join(f"{key}=true" for key in refused)
        models = ", ".join(repr(str(m)) for m in refused.values() if not isinstance(m, bool))
        raise ModaltuneError(
            f"checkpoint {str(checkpoint)!r} asks to run code shipped with its model{' ' + models if models else ''} "
            f"({', '.join(refused)} is on); a checkpoint cannot turn that on by itself. Read that code, and if you "
            f"trust it pass {keys} on the command line"
        )
    base = apply_dotted(meta.get("config") or {}, {key: False for key in asked}, "checkpoint")
    return from_dict(recipe.config_cls, apply_dotted(base, given, "command line"))
