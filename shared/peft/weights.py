"""Methods that train a component's own weights, with no adapter: ``frozen``, ``full`` and ``hft``.

``hft`` is Half Fine-Tuning (arXiv 2404.18466): each stage trains half of every block's weights and freezes the rest
(:func:`half_selection`); the draw is seeded by the seed and the stage, so each stage redraws and a rerun draws the
same. Checkpoints keep every block weight, since any of them may train in some stage.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from torch import nn

from modaltune.shared.peft.base import MethodState, PeftMethod, register_method
from modaltune.shared.peft.targets import block_indices, block_list, in_blocks

if TYPE_CHECKING:  # type hints only
    from modaltune.shared.peft.config import ComponentSpec


class Frozen(PeftMethod):
    """No weight of the component changes."""

    name, help, trains = "frozen", "no weight changes", False


class Full(PeftMethod):
    """Every (floating-point) weight of the component trains; its buffers are saved with it."""

    name, help, full_weights = "full", "every weight of the component trains", True

    def mark(self, base: nn.Module, specs: list[ComponentSpec]) -> None:
        for spec in specs:
            module = base.get_submodule(spec.root) if spec.root else base
            wanted = block_indices(base, spec.root, spec.config.layers, spec.name)
            path = block_list(base, spec.root, spec.name)[0] if wanted is not None else ""
            for name, param in module.named_parameters():
                if param.dtype.is_floating_point and (wanted is None or in_blocks(name, path, set(wanted))):
                    param.requires_grad_(True)


class HalfFineTuning(PeftMethod):
    """Half Fine-Tuning: every block weight may train; each stage trains the half drawn for it."""

    name = "hft"
    help = ("Half Fine-Tuning (arXiv 2404.18466): each stage trains a seeded half of every block's matrices and "
            "norms, redrawn per stage")

    def mark(self, base: nn.Module, specs: list[ComponentSpec]) -> list[tuple[str, str, list[int]]]:
        plans = []
        for spec in specs:  # every block weight may train; each stage draws its half (draw_half)
            path, n = block_list(base, spec.root, spec.name)
            wanted = block_indices(base, spec.root, spec.config.layers, spec.name) or list(range(n))
            prefix = ".".join(p for p in (spec.root, path) if p)
            for i in wanted:
                for param in base.get_submodule(f"{prefix}.{i}").parameters():
                    if param.dtype.is_floating_point:
                        param.requires_grad_(True)
            plans.append((spec.name, prefix, wanted))
        return plans

    def attach(self, model: nn.Module, marks: list[tuple[str, Any]]) -> MethodState | None:
        plans = {comp: (f"{path}.{prefix}" if path else prefix, blocks)
                 for path, found in marks for comp, prefix, blocks in found}
        return HalfPlans(plans) if plans else None


class HalfPlans(MethodState):
    """The hft components of a model: ``{component: (blocks path in the model, block indices)}``."""

    restricts_stages = True

    def __init__(self, plans: dict[str, tuple[str, list[int]]]) -> None:
        self.plans = plans

    def stage_draw(self, model: nn.Module, allowed: set[str] | None, draw: str) -> dict[str, tuple[set[str], dict]]:
        return {comp: draw_half(model, prefix, blocks, f"{draw}:{comp}") for comp, (prefix, blocks)
                in self.plans.items() if allowed is None or comp in allowed}

    def summary(self, drawn: dict[str, dict], seed: int, steps: int) -> dict[str, Any]:
        mine = {comp: s for comp, s in drawn.items() if comp in self.plans}
        return {"half_fine_tuning": mine} if mine else {}


def _attention_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in block.named_modules() if n and "attention" in type(m).__name__.lower()
            and not any(isinstance(c, nn.ModuleList) for c in m.children())]


def _linear_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_children() if isinstance(m, nn.Linear)
            or type(m).__name__ in {"Linear4bit", "Linear8bitLt", "Conv1D"}]


def half_selection(block: nn.Module, rng: random.Random, ffn_more: bool) -> dict[str, list[str]]:
    """The modules of one transformer block that Half Fine-Tuning trains in a stage (names relative to the block),
    by part: ``attention``, ``feed_forward``, ``norm``.

    - attention: in each attention module, half of its projection matrices; they are paired by size (the two largest
      together: q with o, k with v under grouped-query attention) and one of each pair is drawn, so the half is half
      of the parameters too;
    - feed-forward: of the block's other matrices (gate/up/down, fc1/fc2) the larger half when ``ffn_more`` (2 of 3),
      else the smaller half (1 of 3); 2-matrix FFNs train 1 either way;
    - norms: half of the block's normalisation layers (1 of 2), drawn separately inside attention (q/k norms).
    Embeddings and the output head are outside blocks and never train.
    """
    picked: dict[str, list[str]] = {"attention": [], "feed_forward": [], "norm": []}
    in_attention: set[str] = set()
    for name, attn in _attention_modules(block):
        mats = sorted(_linear_children(attn), key=lambda nm: (-nm[1].weight.numel(), nm[0]))
        in_attention |= {f"{name}.{n}" for n, _ in attn.named_modules() if n} | {name}
        for pair in (mats[i:i + 2] for i in range(0, len(mats), 2)):
            picked["attention"].append(f"{name}.{rng.choice(pair)[0]}")
        norms = [f"{name}.{n}" for n, m in attn.named_modules() if n and "norm" in type(m).__name__.lower()]
        picked["norm"] += rng.sample(norms, len(norms) // 2)
    ffn = sorted(n for n, m in block.named_modules() if n and n not in in_attention and
                 (isinstance(m, nn.Linear) or type(m).__name__ in {"Linear4bit", "Linear8bitLt", "Conv1D"}))
    picked["feed_forward"] = sorted(rng.sample(ffn, (len(ffn) + 1) // 2 if ffn_more else len(ffn) // 2))
    norms = sorted(n for n, m in block.named_modules() if n and n not in in_attention
                   and "norm" in type(m).__name__.lower() and not list(m.children()))
    picked["norm"] += sorted(rng.sample(norms, len(norms) // 2 if len(norms) > 1 else len(norms)))
    return picked


def draw_half(model: nn.Module, prefix: str, blocks: list[int], key: str) -> tuple[set[str], dict]:
    """Half Fine-Tuning's draw for one component and stage: the parameter names (relative to ``model``) that train,
    and a summary for the report. ``key`` (seed and stage) seeds the draw, so each stage redraws and a rerun draws
    the same."""
    rng = random.Random(key)
    more = set(rng.sample(blocks, len(blocks) // 2 + (len(blocks) % 2 and rng.random() < 0.5)))
    names: set[str] = set()
    counts: dict[str, int] = {}
    block_params = 0
    for i in blocks:
        block = model.get_submodule(f"{prefix}.{i}")
        block_params += sum(p.numel() for p in block.parameters() if p.dtype.is_floating_point)
        for modules in half_selection(block, rng, i in more).values():
            for mod in modules:
                counts[mod] = counts.get(mod, 0) + 1
                names |= {f"{prefix}.{i}.{mod}.{n}" for n, _ in block.get_submodule(mod).named_parameters()}
    trained = sum(p.numel() for n, p in model.named_parameters() if n in names)
    return names, {"blocks": len(blocks), "block_fraction": round(trained / max(block_params, 1), 4),
                   "matrices_trained_in_blocks": dict(sorted(counts.items()))}


register_method(Frozen())
register_method(Full())
register_method(HalfFineTuning())
