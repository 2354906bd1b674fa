"""MeZO (``train.optimizer: mezo``): zeroth-order training with forward passes only (Malladi et al., 2023).

Each step draws a seed, moves every *trainable* parameter by ``+eps * z`` (``z`` standard normal, regenerated from the
seed, one parameter at a time), measures the batch loss, moves to ``-eps * z``, measures again, restores the weights
from a copy (exactly; fp32 weights beyond 50M values move back by arithmetic instead), and takes
``g = (loss+ - loss-) / (2 eps)`` as the directional derivative along ``z``. The update replays the same ``z``:
``p -= lr * (g * z + weight_decay * p)``, with each component's learning rate and the run's schedule.

Nothing is kept between steps but the weights: no gradients, no optimizer moments, no activations saved for a
backward pass, so a step needs about the memory of an evaluation pass (the Trainer's optimizer exists only to carry
the learning rates its scheduler sets; with no gradients it never allocates state). Frozen weights are never
perturbed, so MeZO composes with the PEFT methods (the reference implementation perturbs every parameter); DyLoRA is
refused, since its masked ranks would take updates their loss never saw. The
seed of step ``t`` comes from ``train.seed`` and ``t``, so a resumed run replays the same directions.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from modaltune.shared.guards import ITEMS_KEY
from modaltune.shared.training import ModaltuneTrainer, autocast


class MeZOTrainer(ModaltuneTrainer):
    """A ModaltuneTrainer whose steps are MeZO's two-forward-pass SPSA updates."""

    _uses_gradients = False

    def __init__(self, *args: Any, mezo_eps: float = 1e-3, precision: str = "fp32", **kwargs: Any) -> None:
        self.mezo_eps = mezo_eps
        self.precision = precision  # the forward passes' autocast (fp16 too: with no backward there is no scaler)
        super().__init__(*args, **kwargs)

    def _loss(self, model, inputs, num_items_in_batch) -> float:
        with self.compute_loss_context_manager(), autocast(self.precision, self.args.device):
            return float(self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch))

    def _trainable(self) -> list[tuple[torch.nn.Parameter, float, float]]:
        """``(parameter, lr, weight decay)`` for each parameter the optimizer's groups hold, in a fixed order."""
        return [(p, group["lr"], group.get("weight_decay", 0.0))
                for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def _perturb(self, params, seed: int, scale: float) -> None:
        for i, (p, _, _) in enumerate(params):
            z = _normal(p, seed, i)
            p.data.add_(z, alpha=scale)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.eval()  # the two passes must see the same network: no dropout between them
        positions = inputs.pop(ITEMS_KEY, None)
        inputs = self._prepare_inputs(inputs)
        params = self._trainable()
        seed = random.Random(f"{self.args.seed}:{self.state.global_step}").getrandbits(62)
        eps = self.mezo_eps
        with torch.no_grad():
            saved = _backup(params)
            self._perturb(params, seed, eps)
            plus = self._loss(model, inputs, num_items_in_batch)
            self._perturb(params, seed, -2 * eps)
            minus = self._loss(model, inputs, num_items_in_batch)
            if saved is None:  # fp32 full fine-tuning: moved back by arithmetic (about one ulp off, as the paper's)
                self._perturb(params, seed, eps)
            else:  # exactly the weights the step started from
                for (p, _, _), kept in zip(params, saved, strict=True):
                    p.data.copy_(kept)
            if torch.distributed.is_available() and torch.distributed.is_initialized():  # one g for every rank
                both = torch.tensor([plus, minus], device=self.args.device)
                torch.distributed.all_reduce(both)
                plus, minus = (both / torch.distributed.get_world_size()).tolist()
            g = (plus - minus) / (2 * eps)
            if not math.isfinite(g):  # no update from a non-finite loss: the guard stops (or skips) this step
                params = []
            for i, (p, lr, decay) in enumerate(params):
                if decay:
                    p.data.mul_(1.0 - lr * decay)
                p.data.add_(_normal(p, seed, i), alpha=-lr * g)
        loss = torch.tensor((plus + minus) / 2, device=self.args.device)
        self.note_loss(loss, inputs, positions)
        return loss


def _backup(params) -> list[torch.Tensor] | None:
    """Copies of the trainable weights, so the perturbations are undone exactly, unless they are fp32 and many
    (full fine-tuning: a copy would double the weights' memory, and fp32 add-then-subtract is off by an ulp)."""
    count = sum(p.numel() for p, _, _ in params)
    if all(p.dtype == torch.float32 for p, _, _ in params) and count > _BACKUP_LIMIT:
        return None
    return [p.detach().clone() for p, _, _ in params]


_BACKUP_LIMIT = 50_000_000  # trainable fp32 values kept as a copy (200 MB); adapters are far below it


def _normal(p: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """The perturbation of parameter ``index`` for ``seed``: the same tensor every time it is asked for."""
    gen = torch.Generator(device=p.device).manual_seed((seed + 7919 * index) % (2 ** 63))
    return torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
