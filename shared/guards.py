"""The training guard: a stage stops at a non-finite loss or gradient norm instead of training on NaN.

A NaN or inf reaching the loss (a broken input, a learning rate that diverges, an fp16 overflow) turns every
trained weight into NaN at the next optimizer step, and the run would still end ``ok`` with a ruined model. The
guard sits in every modaltune Trainer (:class:`NonFiniteGuard`, part of
:class:`modaltune.shared.training.CheckpointingMixin`):

- each micro-batch's loss is checked after its backward, and the gradient norm after clipping, **before** the
  optimizer step, so the weights in memory and every checkpoint on disk stay finite;
- at the first non-finite step (or, with ``train.nonfinite_patience: N``, after N such steps in a row, each one's
  update skipped like an fp16 loss scaler skips an overflow) the stage stops with :class:`NonFiniteError`: one line
  naming the stage, the step, the batch's items where the data set can name them, and the last good checkpoint.

Under a launcher the decision rests on the gradient norm after the ranks' all-reduce, which every rank sees alike,
so the ranks skip or stop together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from modaltune.shared.errors import ModaltuneError

ITEMS_KEY = "_modaltune_items"  # batch key holding the dataset positions of a batch's rows (removed before forward)
SHOWN_ITEMS = 8


class NonFiniteError(ModaltuneError):
    """Training met a non-finite loss or gradient norm."""


class IndexedDataset(torch.utils.data.Dataset):
    """A data set whose items also carry their position, so a batch can name the items it holds."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        return {**item, ITEMS_KEY: i} if isinstance(item, dict) else item

    def __getattr__(self, name: str) -> Any:  # the wrapped set's own attributes (its rows, its examples)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class IndexedCollator:
    """Collates as ``collator`` does and adds the batch's dataset positions under :data:`ITEMS_KEY`."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, batch: list[Any]) -> Any:
        positions = [b.pop(ITEMS_KEY) for b in batch if isinstance(b, dict) and ITEMS_KEY in b]
        out = self.collator(batch)
        if isinstance(out, dict) and len(positions) == len(batch):
            out[ITEMS_KEY] = positions
        return out


def item_name(dataset: Any, i: int) -> str:
    """The name a data set gives its item ``i`` (its id, ``file:line``), or ``#i`` when it keeps none.

    Example:
        >>> class Rows:
        ...     rows = [{"id": "a.jsonl:3"}]
        ...     def __len__(self):
        ...         return 1
        >>> item_name(Rows(), 0), item_name([], 4)
        ('a.jsonl:3', '#4')
    """
    size = len(dataset)
    for attr, get in (("examples", lambda x: getattr(x, "id", None)), ("rows", lambda x: x.get("id")
                      if isinstance(x, dict) else None), ("ids", lambda x: x)):
        seq = getattr(dataset, attr, None)  # one entry per item (a packed set's examples are not its items)
        if isinstance(seq, list) and len(seq) == size and 0 <= i < size:
            name = get(seq[i])
            if name is not None:
                return str(name)
    return f"#{i}"


def _finite(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


def _nonfinite_rows(batch: Any) -> list[int]:
    """Rows of a batch whose floating input tensors hold NaN or inf (the usual culprit of a NaN loss)."""
    rows: set[int] = set()
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 1:
                bad = ~torch.isfinite(value.detach()).reshape(value.shape[0], -1).all(dim=1)  # (B,)
                rows.update(int(r) for r in bad.nonzero().flatten())
            elif isinstance(value, dict):
                rows.update(_nonfinite_rows(value))
    return sorted(rows)


def _any_rank(flag: bool, device: Any) -> bool:
    """``flag`` of any rank (one scalar all-reduce under a launcher), so every rank skips or stops together even
    when only one of them saw a non-finite loss."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    box = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
    return bool(box.item())


def _skip_next_step(optimizer: Any) -> None:
    """Make the optimizer's next ``step()`` a no-op (weights and moments untouched), then restore it."""
    own = vars(optimizer).get("step")

    def skipped(*args: Any, **kwargs: Any) -> None:
        if own is None:
            del optimizer.step
        else:
            optimizer.step = own

    optimizer.step = skipped


class NonFiniteGuard:
    """Trainer mixin: checks each micro-batch's loss and each step's gradient norm before the optimizer step.

    The Trainer must have ``nonfinite_patience`` (steps in a row that may be skipped, 0: stop at the first),
    ``stage_name`` and ``stage_dir`` set; :func:`modaltune.shared.training.run_stages` does.
    """

    nonfinite_patience: int = 0
    stage_name: str = "train"
    stage_dir: Path | None = None

    def _guard_state(self) -> dict[str, Any]:
        state = getattr(self, "_nonfinite", None)
        if state is None:
            state = self._nonfinite = {"in_a_row": 0, "losses": [], "items": [], "rows": [], "skipped": 0}
        return state

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        positions = inputs.pop(ITEMS_KEY, None) if isinstance(inputs, dict) else None
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        self.note_loss(loss, inputs, positions)
        return loss

    def note_loss(self, loss: Any, inputs: Any, positions: list[int] | None) -> None:
        """Record a micro-batch's loss; a non-finite one stops (or skips) the step at its optimizer update.

        A trainer whose ``training_step`` does not call this class's (MeZO's) pops :data:`ITEMS_KEY` from its
        inputs and calls this itself."""
        if not _finite(loss):
            state = self._guard_state()
            state["losses"].append(float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor)
                                   else float(loss))
            rows = _nonfinite_rows(inputs)
            dataset = getattr(self, "train_dataset", None)
            if positions is not None and dataset is not None:
                named = [item_name(dataset, p) for p in (positions if not rows else [positions[r] for r in rows
                                                                                     if r < len(positions)])]
                state["items"] += named
            state["rows"] += rows

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)  # type: ignore[misc]
        state = self._guard_state()
        if not _any_rank(not _finite(grad_norm) or bool(state["losses"]), self.args.device):  # type: ignore[attr-defined]
            state["in_a_row"] = 0
            return grad_norm
        state["in_a_row"] += 1
        what = self._nonfinite_line(grad_norm, state)
        state["losses"], state["items"], state["rows"] = [], [], []
        if state["in_a_row"] > self.nonfinite_patience:
            raise NonFiniteError(what)
        state["skipped"] += 1
        _skip_next_step(self.optimizer)  # type: ignore[attr-defined]
        log = getattr(self, "log_line", None)
        if log is not None:
            log(f"warning: {what.split(';')[0]}; update skipped ({state['in_a_row']} of "
                f"{self.nonfinite_patience} allowed in a row)")
        return float("nan")

    def _nonfinite_line(self, grad_norm: Any, state: dict[str, Any]) -> str:
        step = int(self.state.global_step) + 1  # type: ignore[attr-defined]
        parts = []
        if state["losses"]:
            parts.append(f"loss {state['losses'][0]}")
        if grad_norm is not None and not _finite(grad_norm):
            parts.append(f"gradient norm {float(grad_norm)}")
        if not parts:
            parts.append("loss on another rank")
        items = list(dict.fromkeys(state["items"]))
        where = ""
        if items:
            shown = ", ".join(items[:SHOWN_ITEMS]) + (f" and {len(items) - SHOWN_ITEMS} more" if len(items) >
                                                       SHOWN_ITEMS else "")
            where = f" (batch items with non-finite inputs: {shown})" if state["rows"] else f" (batch: {shown})"
        elif state["rows"]:
            where = f" (batch rows {state['rows'][:SHOWN_ITEMS]} hold non-finite inputs)"
        from modaltune.shared import checkpoint as ckpt

        good = ckpt.latest_checkpoint(self.stage_dir) if self.stage_dir is not None else None
        kept = (f"the last good checkpoint, {good}, is kept (continue from it with train.resume=true once the cause "
                "is fixed)") if good is not None else "no checkpoint of this stage was written yet"
        return (f"stage {self.stage_name!r} stopped at step {step}: non-finite {' and '.join(parts)}{where}; "
                f"{kept}; usual causes: a broken input, a learning rate too high for train.precision (try a lower "
                "train.lr, or train.precision=fp32); train.nonfinite_patience=N skips up to N such steps in a row")
