"""Where a method goes inside a component: target module patterns and the component's block list.

Target patterns are scoped to the component: ``q_proj`` matches every module whose path (relative to the component)
ends in ``q_proj``; globs such as ``layers.*.mlp.*`` match the whole relative path. A pattern that matches nothing
fails with the nearby module names listed. ``layers`` narrows a method to some of the component's blocks (its
``layers``/``blocks``/``h`` list).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import TYPE_CHECKING

from torch import nn

from modaltune.shared.errors import ConfigError

if TYPE_CHECKING:  # type hints only: config.py imports this package's modules
    from modaltune.shared.peft.config import ComponentConfig, ComponentSpec

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def _adaptable_modules(model: nn.Module, root: str) -> dict[str, nn.Module]:
    """Modules under ``root`` that adapters can wrap, keyed by path relative to ``root``."""
    base = model.get_submodule(root) if root else model
    out = {}
    for name, module in base.named_modules():
        if not name:
            continue
        if isinstance(module, ADAPTABLE) or type(module).__name__ in {"Linear4bit", "Linear8bitLt", "Conv1D"}:
            out[name] = module
    return out


BLOCK_LISTS = ("layers", "layer", "blocks", "block", "h")


def block_list(model: nn.Module, root: str, component: str = "") -> tuple[str, int]:
    """``(path relative to root, length)`` of the component's list of transformer/CNN blocks.

    The shallowest ``ModuleList``/``Sequential`` named one of :data:`BLOCK_LISTS` (``layers`` for Whisper and most
    LLMs, ``blocks`` for timm models, ``h`` for GPT-2-style models).

    Raises:
        ConfigError: the component has no such list.
    """
    base = model.get_submodule(root) if root else model
    found = [(name.count("."), name, len(m)) for name, m in base.named_modules()
             if name and name.rsplit(".", 1)[-1] in BLOCK_LISTS and isinstance(m, (nn.ModuleList, nn.Sequential))
             and len(m) > 0]
    if not found:
        raise ConfigError(f"component {component or root!r} has no block list ({'/'.join(BLOCK_LISTS)}) to pick "
                          "`layers` from; remove `layers` or narrow `targets` with globs instead")
    _, name, length = min(found)
    return name, length


def block_indices(model: nn.Module, root: str, layers: list[int] | None, component: str = "") -> list[int] | None:
    """``layers`` as sorted non-negative block indices (None stays None: every block).

    Raises:
        ConfigError: an index is outside the component's blocks.
    """
    if layers is None:
        return None
    _, n = block_list(model, root, component)
    out = set()
    for i in layers:
        if not -n <= i < n:
            raise ConfigError(f"{component}.layers: block {i} does not exist; the component has {n} blocks "
                              f"(0..{n - 1}, or -{n}..-1 from the top)")
        out.add(i % n)
    return sorted(out)


def in_blocks(rel_name: str, blocks_path: str, wanted: set[int]) -> bool:
    """Whether ``rel_name`` lies inside block ``i`` of the list at ``blocks_path`` for an ``i`` in ``wanted``."""
    m = re.match(re.escape(blocks_path) + r"\.(\d+)(\.|$)", rel_name)
    return bool(m) and int(m.group(1)) in wanted


def resolve_targets(model: nn.Module, root: str, patterns: list[str], component: str,
                    layers: list[int] | None = None) -> list[str]:
    """Full module names (from ``model``) matched by ``patterns`` under ``root`` (inside ``layers`` when given).

    Raises:
        ConfigError: a pattern matches nothing; the message lists nearby module names.
    """
    candidates = _adaptable_modules(model, root)
    wanted = block_indices(model, root, layers, component)
    if wanted is not None:
        path, _ = block_list(model, root, component)
        candidates = {n: m for n, m in candidates.items() if in_blocks(n, path, set(wanted))}
    found: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, "*." + pattern)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            near = difflib.get_close_matches(pattern.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.3)
            raise ConfigError(
                f"LoRA/IA3 target {pattern!r} of component {component!r} matches no module"
                f"{' under ' + repr(root) if root else ''}{f' in blocks {wanted}' if wanted is not None else ''}. "
                f"Nearby names: {', '.join(near) if near else 'none'}; adaptable module names here: "
                f"{', '.join(leaves[:30])}{' ...' if len(leaves) > 30 else ''}"
            )
        found.extend(hits)
    prefix = f"{root}." if root else ""
    return sorted({prefix + n for n in found})


def targets_of(model: nn.Module, spec: ComponentSpec) -> list[str]:
    """The full module names a component's ``targets`` (inside its ``layers``) match in ``model``."""
    return resolve_targets(model, spec.root, spec.config.targets, spec.name, spec.config.layers)


def check_targets(cfg: ComponentConfig, where: str) -> None:
    """An adapter method needs at least one target pattern.

    Raises:
        ConfigError: ``cfg.targets`` is empty.
    """
    if not cfg.targets:
        raise ConfigError(f"{where}.targets is empty: {cfg.method} needs at least one module pattern")


def all_targets(model: nn.Module, specs: list[ComponentSpec]) -> list[str]:
    """The full module names every component of ``specs`` adapts, component by component."""
    return [t for spec in specs for t in targets_of(model, spec)]


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights are counted as their logical size."""
    trainable = total = 0
    seen: set[int] = set()
    for param in module.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
