"""The model every recipe trains: named components, and the record of which weights train.

A :class:`ModaltuneModel` maps component names (``llm``, ``encoder``, ``projector`` ...) to module paths inside
it. After PEFT methods are applied it records which parameters train (LoRA weights, fully-trained modules such
as a projector); checkpoints save exactly those, whatever stage froze them later, so no trained weight is lost.
It names no method: what a method keeps on the model (fixed weights, a draw per stage, a rank controller) is that
method's :class:`~modaltune.shared.peft.MethodState`, whose hooks it calls.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from modaltune.shared.errors import ModaltuneError
from modaltune.shared.peft import MARKS, MethodState, count_parameters, get_method
from modaltune.shared.peft.base import registry_position


class _Reached(Exception):
    """Stops a forward pass once the wanted block is reached."""


def block_input(block: nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """The hidden states ``block`` receives when ``run()`` (a forward pass through a model containing it) reaches
    it; the pass stops there, so the blocks above are never computed. Encoder caches use it to keep the output of
    a model's frozen lower blocks."""
    captured: list[torch.Tensor] = []

    def grab(_module, args, kwargs):
        captured.append(args[0] if args else next(iter(kwargs.values())))
        raise _Reached

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run()
    except _Reached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ModaltuneError(f"the forward pass never reached {type(block).__name__}: that block is not on the "
                             "encoder's path, so its input cannot be cached; turn the feature cache off")
    return captured[0]


class ModaltuneModel(nn.Module):
    """Base class: subclasses set ``self.components`` (name -> module path) and implement ``forward``.

    ``forward(**batch)`` returns a mapping with ``loss`` when ``labels`` are given, as the Trainer expects: the mean
    over labelled tokens, position ``t`` predicting ``labels[t+1]`` (``shifted_labels``; an encoder-decoder whose
    labels are already aligned sets it False).
    """

    components: dict[str, str]
    shifted_labels: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.components = {}
        self._trained: set[str] = set()
        self._trained_buffers: set[str] = set()
        self._states: dict[str, MethodState] = {}  # method name -> its state on this model (registry order)

    def component_of(self, name: str) -> str | None:
        """The component a parameter or buffer name belongs to (longest matching root)."""
        best, best_len = None, -1
        for comp, root in self.components.items():
            if (name == root or name.startswith(root + ".")) and len(root) > best_len:
                best, best_len = comp, len(root)
        return best

    def record_trained(self, full_components: list[str] = ()) -> None:
        """Remember the currently trainable parameters (and buffers of fully-trained components) as trained, and
        build each method's state from what :func:`~modaltune.shared.peft.apply_peft` marked on the models inside."""
        # fixed weights (LoRA-FA's A) stay trained weights (saved) on a second call, though they never require grad
        self._trained = {n for n, p in self.named_parameters() if p.requires_grad} | self.fixed_factors
        marks: dict[str, list[tuple[str, object]]] = {}
        for path, module in self.named_modules():
            for name, found in vars(module).get(MARKS, {}).items():  # its own attribute (peft wrappers forward
                marks.setdefault(name, []).append((path, found))  # getattr inward)
        for state in self._states.values():  # one state per method: the previous one's hooks come off
            state.remove()
        self._states = {}
        for name in sorted(marks, key=registry_position):
            state = get_method(name).attach(self, marks[name])
            if state is not None:
                self._states[name] = state
        if any(state.restricts_stages for state in self._states.values()):  # the parameter counts report a stage
            self.set_stage_trainable(None, draw="setup")
        self._trained_buffers = {
            n
            for n, b in self.named_buffers()
            if self.component_of(n) in set(full_components) and b.dtype.is_floating_point
        }

    @property
    def fixed_factors(self) -> set[str]:
        """Trained weights that never receive gradients (saved with the model, read by its optimizer)."""
        return set().union(*(state.fixed for state in self._states.values()))

    def peft_state(self, method: str) -> MethodState | None:
        """The state method ``method`` keeps on this model (None when no component uses it)."""
        return self._states.get(method)

    @property
    def peft_states(self) -> list[MethodState]:
        """Every method's state on this model, in registry order (their training hooks run in this order)."""
        return list(self._states.values())

    @property
    def trained_names(self) -> set[str]:
        return set(self._trained)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trained weight (whatever the current stage freezes), detached, on CPU, contiguous."""
        out = {}
        for name, param in self.named_parameters():
            if name in self._trained:
                out[name] = param.detach().to("cpu").contiguous()
        for name, buf in self.named_buffers():
            if name in self._trained_buffers:
                out[name] = buf.detach().to("cpu").contiguous()
        return out

    def set_stage_trainable(self, components: list[str] | None, draw: str = "") -> dict[str, dict]:
        """Let only the trained parameters of ``components`` (all when ``None``) receive gradients.

        A method that trains a drawn part of its components (Half Fine-Tuning's half of the block weights) draws it
        for ``draw`` (the seed and stage: a new draw each stage, the same one on a rerun); returns each such
        component's draw summary. Fixed weights never train.
        """
        allowed = None if components is None else set(components)
        half: set[str] = set()
        drawn = {}
        for state in self._states.values():
            for comp, (names, summary) in state.stage_draw(self, allowed, draw).items():
                drawn[comp] = summary
                half |= names
        fixed = self.fixed_factors
        for name, param in self.named_parameters():
            on = name in self._trained and name not in fixed and (
                allowed is None or self.component_of(name) in allowed)
            if on and self.component_of(name) in drawn:
                on = name in half
            param.requires_grad_(on)
        return drawn

    def parameter_report(self) -> dict[str, dict[str, int]]:
        """Trainable and total parameters per component, plus ``total``."""
        report = {}
        for comp, root in self.components.items():
            module = self.get_submodule(root)
            trainable, total = count_parameters(module)
            report[comp] = {"trainable": trainable, "total": total}
        trainable, total = count_parameters(self)
        report["total"] = {"trainable": trainable, "total": total}
        return report

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        """Turn on activation checkpointing in the transformers model inside."""
        kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}
        for module in self.modules():
            if module is not self and hasattr(module, "activation_checkpointing_enable") and hasattr(module, "config"):
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                if hasattr(module, "enable_input_require_grads"):
                    module.enable_input_require_grads()
                return

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
