"""One run as several processes: what a rank does when ``torchrun`` or ``accelerate launch`` started it.

modaltune launches nothing. A launcher starts N copies of ``modaltune run ...`` and sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; the transformers Trainer then trains data-parallel. Everything around training follows one
design, the same in every recipe:

- **data preparation** (building a built-in data set, installing a packaged model) runs on each node's local rank 0
  first while the node's other ranks wait, then on them (they find it built): :func:`local_main_first`;
- **evaluation and generation** run on global rank 0 only; the other ranks wait and receive its results, so every
  rank assembles the same report: :func:`on_main` (a generation loop is not sharded, by design: it is short next
  to training and its outputs stay in one order);
- **files**: only rank 0 writes the run folder (report, logs, plots, the resolved config, checkpoints outside the
  Trainer's own) and only rank 0 prints: :func:`is_main`.

A failure on one rank reaches the others as an error naming the rank, instead of a hang until the timeout. A rank
that dies outright (killed, out of memory) cannot say so: each rank notes its PID in the run folder
(:func:`watch_ranks`), and when the launcher stops the survivors (SIGTERM) or a collective breaks, rank 0 looks for
the rank whose process is gone and names it in the run's failure line and report (:func:`explain_failure`).
With one process every helper here is a no-op, except that SIGTERM (a scheduler's preemption, ``kill``) ends the
run as an interruption with its report written, not mid-line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

from modaltune.shared.errors import ModaltuneError

T = TypeVar("T")
TIMEOUT_ENV = "MODALTUNE_DIST_TIMEOUT"  # seconds a rank waits for the others (evaluation on rank 0 included)
DEFAULT_TIMEOUT = 4 * 3600
_state = threading.local()


def world_size() -> int:
    """Processes in the run (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    """This process's rank on its node."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    """Global rank 0: the process that evaluates, writes and prints."""
    return rank() == 0


def is_local_main() -> bool:
    """Rank 0 of its node: the process that prepares the node's data."""
    return local_rank() == 0


def timeout_seconds() -> int:
    """How long a rank waits for the others (``MODALTUNE_DIST_TIMEOUT``, default 4 hours: rank 0's evaluations
    run while the others wait)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        return int(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise ModaltuneError(f"{TIMEOUT_ENV}={raw!r}: give whole seconds, e.g. {DEFAULT_TIMEOUT}") from None


def init() -> bool:
    """Join the launcher's process group (gloo on CPU, NCCL on CUDA, this rank's GPU selected); the Trainer reuses
    it. Returns whether the run is distributed."""
    if world_size() <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_seconds()))
    return True


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


def _deepspeed_stage() -> int | None:
    """The ZeRO stage ``accelerate launch`` asked for (its flag or its DeepSpeed JSON), or None."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
    if stage.isdigit():
        return int(stage)
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    if path:
        import json

        try:
            data = json.loads(open(path, encoding="utf-8").read())
        except (OSError, ValueError) as exc:
            raise ModaltuneError(f"DeepSpeed config {path!r} could not be read: {exc}") from None
        stage = (data.get("zero_optimization") or {}).get("stage")
        return int(stage) if isinstance(stage, int) else None
    return None


def refuse_sharded_parameters() -> None:
    """Fail at the start, with the fix, when the launcher asks for parameter sharding (FSDP, DeepSpeed ZeRO-3).

    modaltune's checkpoints hold whole tensors read from the model (every trained weight, projectors included) and
    resume loads them back the same way; sharded parameters would be saved as empty shards. Accelerate also turns
    an FSDP request into plain DDP on CPU without a word. Data parallelism (DDP) and ZeRO-1/2 keep whole parameters
    on every rank and work.
    """
    fix = ("launch with plain data parallelism (torchrun, or accelerate launch without FSDP) or DeepSpeed ZeRO-2 "
           "(recipes/accelerate/); for a model too large for one GPU, train it quantised (llm.method=qlora)")
    if _truthy("ACCELERATE_USE_FSDP"):
        raise ModaltuneError(f"FSDP shards parameters, which modaltune checkpoints cannot hold yet: {fix}")
    if _truthy("ACCELERATE_USE_DEEPSPEED") and _deepspeed_stage() == 3:
        raise ModaltuneError(f"DeepSpeed ZeRO-3 shards parameters, which modaltune checkpoints cannot hold yet: {fix}")


def device_index() -> int:
    """This rank's CUDA device (where a quantised model is placed)."""
    import torch

    return local_rank() % max(torch.cuda.device_count(), 1)


def _gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def _raise_if_failed(statuses: list[Any], what: str) -> None:
    for r, status in enumerate(statuses):
        if status is not None and r != rank():
            raise ModaltuneError(f"rank {r} failed while {what}: {status} (its own output has the details)")


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if init():
        _gather(None)


@contextlib.contextmanager
def local_main_first(what: str = "preparing data") -> Iterator[None]:
    """Run the block on each node's local rank 0 first, then on the node's other ranks (which find the data it
    built). A failure on a preparing rank is raised on every rank."""
    if getattr(_state, "inside", False) or not init():  # inside on_main only rank 0 runs: nothing to wait for
        yield
        return
    error = None
    if is_local_main():
        try:
            yield
        except BaseException as exc:  # tell the waiting ranks, then fail here too
            error = exc
        statuses = _gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        _raise_if_failed(statuses, what)
    else:
        _raise_if_failed(_gather(None), what)
        yield


def on_main(fn: Callable[[], T], what: str = "evaluating") -> T:
    """``fn()`` on rank 0; every rank returns its result (picklable). Nested calls run directly, so a helper built
    on this can call another. A failure on rank 0 is raised on every rank."""
    if getattr(_state, "inside", False) or not init():
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    error: BaseException | None = None
    if is_main():
        _state.inside = True
        try:
            box[0] = ("ok", fn())
        except BaseException as exc:
            error = exc
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
        finally:
            _state.inside = False
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status != "ok":
        raise ModaltuneError(f"rank 0 failed while {what}: {value} (its log has the details)")
    return value


RANKS_DIR = ".ranks"  # in the run folder: one file per rank with its host and PID


class Stopped(Exception):
    """The process was asked to stop (SIGTERM): by a launcher after another rank failed, by a scheduler, by kill."""


_previous_sigterm: list[Any] = []


@contextlib.contextmanager
def watch_ranks(run_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Around a run's work: note this rank's PID in the run folder and turn SIGTERM into :class:`Stopped`. After the
    block a SIGTERM is held off (ignored) so the report can be written; :func:`restore_sigterm` ends that."""
    from pathlib import Path

    if world_size() > 1:
        folder = Path(run_dir) / RANKS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        (folder / str(rank())).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),
                                          encoding="utf-8")

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the report is written after this
        raise Stopped("stopped by SIGTERM")

    try:
        _previous_sigterm.append(signal.signal(signal.SIGTERM, on_term))
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def restore_sigterm() -> None:
    """Put back the SIGTERM handler :func:`watch_ranks` replaced."""
    if _previous_sigterm:
        signal.signal(signal.SIGTERM, _previous_sigterm.pop())


def _gone(pid: int) -> bool:
    """True when process ``pid`` no longer runs on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in {"Z", "X"}
    except (OSError, IndexError):
        return False


def dead_ranks(run_dir: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """``(rank, pid)`` of the ranks on this host whose process is gone (ranks on other hosts cannot be checked)."""
    from pathlib import Path

    found = []
    host = socket.gethostname()
    for file in sorted((Path(run_dir) / RANKS_DIR).glob("*")):
        try:
            info = json.loads(file.read_text(encoding="utf-8"))
            r, pid = int(file.name), int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if r != rank() and info.get("host") == host and _gone(pid):
            found.append((r, pid))
    return found


def explain_failure(exc: BaseException, run_dir: str | os.PathLike[str]) -> BaseException:
    """Under a launcher, turn the error a surviving rank sees when another rank died (the launcher's SIGTERM, a
    broken collective) into one naming the dead rank; any other error comes back as it is."""
    stopped = isinstance(exc, Stopped)
    if world_size() <= 1 or isinstance(exc, ModaltuneError):  # one already says what happened
        return exc
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    broken = stopped or any(word in text.lower() for word in ("connection", "closed", "peer", "gloo", "nccl",
                                                             "timed out", "timeout", "broken pipe"))
    if not broken:
        return exc
    dead = dead_ranks(run_dir)
    for _ in range(50):  # a killed peer's sockets close a moment before its process is gone: wait up to 5 s
        if dead:
            break
        time.sleep(0.1)
        dead = dead_ranks(run_dir)
    who = ", ".join(f"rank {r} (PID {pid})" for r, pid in dead) + " died" if dead else \
        "another rank failed or was stopped"
    how = "the launcher stopped this rank" if stopped else f"this rank's collective broke ({text[:160]})"
    return ModaltuneError(
        f"{who} during the run, so {how}; that rank's own output (the launcher's log) says why. Completed checkpoints "
        "are kept: continue with train.resume=true and the same --out")
