"""What a run ran on: CPU model and features, threads, oneDNN and the kernel it picks for bf16, GPU, versions.

Two machines with the same pinned stack can still train to different figures when their CPUs differ (bf16 kernels
chosen for the CPU round differently) or when they run a different number of threads. Every report carries this
section so two reports can be compared on it.
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
from typing import Any

CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                    "ATEN_CPU_CAPABILITY", "OPENBLAS_CORETYPE", "CUBLAS_WORKSPACE_CONFIG")


def cpu_info() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``avx512_bf16``, ``amx_bf16`` ...); empty where the OS does not say."""
    return set(cpu_info().get("flags", "").split())


def onednn_probe() -> dict[str, str]:
    """Run one small bf16 matmul with oneDNN's verbose log on and read which ISA and kernel oneDNN chose."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return {}
    fd, path = tempfile.mkstemp(prefix="modaltune-onednn-")
    saved = os.dup(1)
    try:
        import sys

        sys.stdout.flush()
        os.dup2(fd, 1)
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            a = torch.ones(32, 32, dtype=torch.bfloat16)
            torch.matmul(a, a)
    except Exception:  # the probe is informative only
        return {}
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(fd)
    try:
        log = open(path, encoding="utf-8", errors="replace").read()
    finally:
        os.unlink(path)
    out = {}
    isa = re.search(r"info,cpu,isa:(.*)", log)
    if isa:
        out["onednn_isa"] = isa.group(1).strip()
    kernel = re.search(r"exec,cpu,matmul,([^,]+)", log)
    if kernel:
        out["onednn_bf16_matmul"] = kernel.group(1)
    return out


_KERNEL: list[str | None] = []


def bf16_matmul_kernel() -> str | None:
    """The oneDNN kernel this process uses for a bf16 matmul (e.g. ``brg_matmul:avx10_1_512_amx``), probed once;
    ``"none"`` when oneDNN says it has no bf16 support here (its ISA capped, e.g. ``ONEDNN_MAX_CPU_ISA=AVX2``, or
    a VM hiding the instructions); None when it cannot tell."""
    if not _KERNEL:
        import torch

        try:
            supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # an internal API: when it is gone, ask the verbose log alone
            supported = True
        _KERNEL.append(onednn_probe().get("onednn_bf16_matmul") if supported else "none")
    return _KERNEL[0]


def environment(*, probe: bool = True) -> dict[str, Any]:
    """The facts that decide a run's numerics and speed, for the report's Environment section."""
    import torch

    from modaltune.shared.checkpoint import versions

    cpu = cpu_info()
    flags = set(cpu.get("flags", "").split())
    env: dict[str, Any] = {
        "cpu": cpu.get("model name", platform.processor() or platform.machine()),
        "cpu_family_model_stepping": "/".join(cpu.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "cpu_cache": cpu.get("cache size", ""),
        "cpu_features": " ".join(f for f in CPU_FEATURES if f in flags),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn": _onednn_version(),
        **({"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda} if torch.cuda.is_available() else {}),
        **{f"version_{k}": v for k, v in versions().items()},
        "platform": platform.platform(),
        **{f"env_{k}": os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
    }
    if probe:
        env.update(onednn_probe())
    return env


def _onednn_version() -> str:
    import torch

    match = re.search(r"MKL-DNN (v[\d.]+)", torch.__config__.show())
    return match.group(1) if match else ("available" if torch.backends.mkldnn.is_available() else "absent")
