"""MeZO (``train.optimizer: mezo``): zeroth-order training with forward passes only (Malladi et al., 2023).

Each step draws a seed, moves every *trainable* parameter by ``+eps * z`` (``z`` standard normal, regenerated from the
seed, one parameter at a time), measures the batch loss, moves to ``-eps * z``, measures again, moves back, and takes
``g = (loss+ - loss-) / (2 eps)`` as the directional derivative along ``z``. The update replays the same ``z``:
``p -= lr * (g * z + weight_decay * p)``, with each component's learning rate and the run's schedule.

Nothing is kept between steps but the weights: no gradients, no optimizer moments, no activations saved for a
backward pass, so a step needs about the memory of an evaluation pass (the Trainer's optimizer exists only to carry
the learning rates its scheduler sets; with no gradients it never allocates state). Frozen weights are never
perturbed, so MeZO composes with any PEFT method (the reference implementation perturbs every parameter). The
seed of step ``t`` comes from ``train.seed`` and ``t``, so a resumed run replays the same directions.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from modaltune.shared.training import ModaltuneTrainer


class MeZOTrainer(ModaltuneTrainer):
    """A ModaltuneTrainer whose steps are MeZO's two-forward-pass SPSA updates."""

    def __init__(self, *args: Any, mezo_eps: float = 1e-3, **kwargs: Any) -> None:
        self.mezo_eps = mezo_eps
        super().__init__(*args, **kwargs)
        self.projected_grads: list[float] = []

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
        inputs = self._prepare_inputs(inputs)
        params = self._trainable()
        seed = random.Random(f"{self.args.seed}:{self.state.global_step}").getrandbits(62)
        eps = self.mezo_eps
        with torch.no_grad():
            self._perturb(params, seed, eps)
            with self.compute_loss_context_manager():
                plus = float(self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch))
            self._perturb(params, seed, -2 * eps)
            with self.compute_loss_context_manager():
                minus = float(self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch))
            self._perturb(params, seed, eps)
            if torch.distributed.is_available() and torch.distributed.is_initialized():  # one g for every rank
                both = torch.tensor([plus, minus], device=self.args.device)
                torch.distributed.all_reduce(both)
                plus, minus = (both / torch.distributed.get_world_size()).tolist()
            g = (plus - minus) / (2 * eps)
            self.projected_grads.append(g)
            for i, (p, lr, decay) in enumerate(params):
                if decay:
                    p.data.mul_(1.0 - lr * decay)
                p.data.add_(_normal(p, seed, i), alpha=-lr * g)
        return torch.tensor((plus + minus) / 2, device=self.args.device)


def _normal(p: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """The perturbation of parameter ``index`` for ``seed``: the same tensor every time it is asked for."""
    gen = torch.Generator(device=p.device).manual_seed((seed + 7919 * index) % (2 ** 63))
    return torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
