"""PEFT methods applied per component, by config.

A *component* is a named part of a model (``llm``; ``encoder``/``decoder`` of Whisper; ``projector``) rooted at a
module path. Each component gets one method:

=================  ==========================================================================================
``frozen``         no weight changes
``full``           every weight of the component trains
``lora``           low-rank adapters on the target modules
``dora``           weight-decomposed LoRA (``use_dora``)
``dylora``         DyLoRA: LoRA trained at a rank drawn per step (1..r, lower ranks shared), so it can be used at
                   any rank up to ``r`` afterwards (:mod:`modaltune.shared.dylora`)
``lora_fa``        LoRA-FA: LoRA whose ``A`` stays at its initialisation; ``B`` trains with peft's LoRA-FA optimizer
                   (its gradient projected onto ``A``'s row space), so neither A's gradients nor their optimizer
                   state exist
``qlora``          LoRA on a 4-bit NF4 base with double quantisation (bitsandbytes; the model is loaded so)
``lora8bit``       LoRA on an 8-bit (LLM.int8) base
``ia3``            learned rescaling vectors on the target modules
``prompt_tuning``  trainable virtual-token embeddings (causal LM component only)
``prefix_tuning``  trainable per-layer key/value prefixes (causal LM component only)
=================  ==========================================================================================

Target patterns are scoped to the component: ``q_proj`` matches every module whose path (relative to the component)
ends in ``q_proj``; globs such as ``layers.*.mlp.*`` match the whole relative path. A pattern that matches nothing
fails with the nearby module names listed.

``layers`` narrows a method to some of the component's blocks (its ``layers``/``blocks``/``h`` list): ``[-1]`` is
the top block, ``[-2, -1]`` the top two. Adapters go only on targets inside those blocks, and ``full`` unfreezes
only them. Tuning only the top blocks of a frozen encoder keeps its lower blocks cacheable (see
:mod:`modaltune.audio.features`).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import random
import re
from typing import Literal

from torch import nn

from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError

Method = Literal["frozen", "full", "hft", "lora", "dora", "dylora", "lora_fa", "qlora", "lora8bit", "ia3",
                 "prompt_tuning", "prefix_tuning"]
WEIGHT_METHODS = {"full", "hft"}  # train the component's own weights, no adapter
LORA_FAMILY = {"lora", "dora", "dylora", "lora_fa", "qlora", "lora8bit"}
PROMPT_METHODS = {"prompt_tuning", "prefix_tuning"}
QUANTISED = {"qlora": "4bit", "lora8bit": "8bit"}


@dataclasses.dataclass
class ComponentConfig:
    """How one component is tuned."""

    method: Method = doc("frozen", "frozen | full | hft (Half Fine-Tuning: half of each block's matrices, redrawn per "
                                   "stage) | lora | dora | dylora (all ranks up to r) | lora_fa (A frozen) | qlora | "
                                   "lora8bit | ia3 | prompt_tuning | prefix_tuning")
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
        if self.r < 1:
            raise ConfigError(f"{where}.r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout}")
        if self.method in LORA_FAMILY | {"ia3"} and not self.targets:
            raise ConfigError(f"{where}.targets is empty: {self.method} needs at least one module pattern")
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"{where}.num_virtual_tokens must be at least 1")
        if self.layers is not None:
            if not self.layers:
                raise ConfigError(f"{where}.layers is empty: list block indices (e.g. [-1]) or use null for all")
            if self.method in PROMPT_METHODS:
                raise ConfigError(f"{where}.layers does not apply to {self.method} (it adds virtual tokens, not "
                                  "per-block weights)")
        if self.eval_ranks is not None:
            if self.method != "dylora":
                raise ConfigError(f"{where}.eval_ranks applies to method dylora only ({where}.method is "
                                  f"{self.method}); remove it or set {where}.method=dylora")
            bad = [b for b in self.eval_ranks if not 1 <= b <= self.r]
            if bad:
                raise ConfigError(f"{where}.eval_ranks {bad} are outside 1..{self.r} (the adapter's rank, {where}.r)")

    @property
    def trains(self) -> bool:
        return self.method != "frozen"


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


def _in_blocks(rel_name: str, blocks_path: str, wanted: set[int]) -> bool:
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
        candidates = {n: m for n, m in candidates.items() if _in_blocks(n, path, set(wanted))}
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


@dataclasses.dataclass
class ComponentSpec:
    """A component of one transformers model: its name, root module path and tuning config."""

    name: str
    root: str
    config: ComponentConfig


def apply_peft(model: nn.Module, specs: list[ComponentSpec], *, causal_lm: bool = True) -> nn.Module:
    """Apply each component's method to ``model`` (one transformers model) and return the model to train.

    LoRA-family, IA3 and prompt methods wrap ``model`` in a ``peft.PeftModel``; ``full`` components are unfrozen
    afterwards; ``frozen`` ones stay frozen. All components of one model that use adapters must share one
    adapter type (LoRA with DoRA on one and plain LoRA on another is refused).
    """
    import peft

    by_method: dict[str, list[ComponentSpec]] = {}
    for spec in specs:
        by_method.setdefault(spec.config.method, []).append(spec)
    # LoRA-FA's optimizer and DyLoRA's rank controller act on every LoRA layer of a model: neither shares one
    adapter_kinds = {"lora" if m in LORA_FAMILY - {"dora", "dylora", "lora_fa"} else m for m in by_method
                     if m not in WEIGHT_METHODS | {"frozen"}}
    if len(adapter_kinds) > 1:
        names = ", ".join(f"{s.name}={s.config.method}" for s in specs
                          if s.config.method not in WEIGHT_METHODS | {"frozen"})
        raise ConfigError(
            f"one model can carry one adapter type, but its components ask for several ({names}); "
            "use the same method for them (e.g. all lora) or make some full/frozen"
        )
    for param in model.parameters():
        param.requires_grad_(False)

    kind = next(iter(adapter_kinds), None)
    adapter_specs = [s for s in specs if s.config.method not in WEIGHT_METHODS | {"frozen"}]
    if kind is not None:
        if kind in PROMPT_METHODS:
            if not causal_lm or len(adapter_specs) != 1 or adapter_specs[0].root:
                raise ConfigError(f"{kind} applies to a whole causal LM component, not to {adapter_specs[0].name!r}")
            model = _prompt_model(model, adapter_specs[0].config, kind)
        else:
            targets: list[str] = []
            for spec in adapter_specs:
                targets += _targets(model, spec)
            first = adapter_specs[0].config
            if kind == "ia3":
                ff: list[str] = []
                for spec in adapter_specs:
                    ff += [
                        t
                        for t in _targets(model, spec)
                        if any(fnmatch.fnmatchcase(t, "*" + p) for p in spec.config.feedforward)
                    ]
                cfg = peft.IA3Config(target_modules=targets, feedforward_modules=ff)
            else:
                rank_pattern = {}
                alpha_pattern = {}
                for spec in adapter_specs[1:]:
                    for t in _targets(model, spec):
                        rank_pattern[t] = spec.config.r
                        alpha_pattern[t] = spec.config.alpha
                cfg = peft.LoraConfig(
                    r=first.r,
                    lora_alpha=first.alpha,
                    lora_dropout=first.dropout,
                    target_modules=targets,
                    rank_pattern=rank_pattern,
                    alpha_pattern=alpha_pattern,
                    use_dora=first.method == "dora" or "dora" in by_method,
                    bias="none",
                )
            if any(s.config.method in QUANTISED for s in adapter_specs):
                model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            model = peft.get_peft_model(model, cfg)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "lora_fa" in by_method:  # A is saved with the adapter but never trained (ModaltuneModel.record_trained)
        setattr(base, FIXED_FACTORS, [s.root for s in by_method["lora_fa"]])
    if "dylora" in by_method:  # the rank each step trains is set by modaltune.shared.dylora
        from modaltune.shared.dylora import NESTED

        setattr(base, NESTED, [s.root for s in by_method["dylora"]])
    for spec in by_method.get("full", []):
        module = base.get_submodule(spec.root) if spec.root else base
        wanted = block_indices(base, spec.root, spec.config.layers, spec.name)
        path = block_list(base, spec.root, spec.name)[0] if wanted is not None else ""
        for name, param in module.named_parameters():
            if param.dtype.is_floating_point and (wanted is None or _in_blocks(name, path, set(wanted))):
                param.requires_grad_(True)
    for spec in by_method.get("hft", []):  # every block weight may train; each stage draws its half (draw_half)
        path, n = block_list(base, spec.root, spec.name)
        wanted = block_indices(base, spec.root, spec.config.layers, spec.name) or list(range(n))
        prefix = ".".join(p for p in (spec.root, path) if p)
        for i in wanted:
            for param in base.get_submodule(f"{prefix}.{i}").parameters():
                if param.dtype.is_floating_point:
                    param.requires_grad_(True)
        plans = getattr(base, HALF_PLANS, {})
        plans[spec.name] = (prefix, wanted)
        setattr(base, HALF_PLANS, plans)
    return model


HALF_PLANS = "_modaltune_half_plans"  # on a transformers model: component -> (blocks path, block indices) for hft
FIXED_FACTORS = "_modaltune_fixed_factors"  # on a transformers model: roots of the components whose LoRA A is fixed


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


def _targets(model: nn.Module, spec: ComponentSpec) -> list[str]:
    return resolve_targets(model, spec.root, spec.config.targets, spec.name, spec.config.layers)


def _prompt_model(model: nn.Module, cfg: ComponentConfig, kind: str) -> nn.Module:
    import peft

    if kind == "prompt_tuning":
        init = peft.PromptTuningInit.TEXT if cfg.prompt_init_text else peft.PromptTuningInit.RANDOM
        tok_path = getattr(model.config, "_name_or_path", None)
        pcfg = peft.PromptTuningConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=init,
            prompt_tuning_init_text=cfg.prompt_init_text,
            tokenizer_name_or_path=tok_path if cfg.prompt_init_text else None,
        )
    else:
        pcfg = peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    return peft.get_peft_model(model, pcfg)


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
