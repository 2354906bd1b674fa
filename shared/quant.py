"""bitsandbytes 4/8-bit quantisation for QLoRA and LoRA-on-int8.

Only the transformers model that carries LoRA is ever quantised, and inside it the output head stays in full
precision unless a component asks (``quantize_head``); projectors and encoders are separate modules and are never
passed here.
"""

from __future__ import annotations

import torch

from modaltune.shared.errors import ModaltuneError
from modaltune.shared.peft import get_method


def check_bitsandbytes(method: str) -> None:
    """Fail with one clear line if bitsandbytes cannot quantise on this machine."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError or a broken native library
        raise ModaltuneError(
            f"{method} needs bitsandbytes, which cannot be imported here ({exc.__class__.__name__}: {exc}); "
            "install it (pip install bitsandbytes) or use method: lora"
        ) from None
    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        probe = torch.randn(64, 64)
        packed, state = quantize_4bit(probe, quant_type="nf4")
        dequantize_4bit(packed, state)
    except Exception as exc:
        raise ModaltuneError(
            f"{method}: bitsandbytes is installed but cannot quantise on this machine "
            f"({exc.__class__.__name__}: {exc}); use method: lora"
        ) from None


def bnb_config(method: str, *, compute_dtype: torch.dtype, skip_modules: list[str]):
    """A ``BitsAndBytesConfig`` for a method that asks for a quantised base (``quantised``: ``4bit`` is NF4 with
    double quantisation, ``8bit`` LLM.int8); ``None`` for the others."""
    level = get_method(method).quantised
    if level is None:
        return None
    check_bitsandbytes(method)
    from transformers import BitsAndBytesConfig

    if level == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip_modules,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)


def quantized_load_kwargs(method: str, *, compute_dtype: torch.dtype, skip_modules: list[str]) -> dict:
    """``from_pretrained`` keyword arguments that load a model quantised for ``method`` (one whose ``quantised`` is set).

    On a GPU the quantised weights are placed on this rank's device (bitsandbytes needs them there at load time;
    under torchrun / accelerate launch each rank holds its own copy on its own GPU).
    """
    from modaltune.shared import dist

    kwargs = {
        "quantization_config": bnb_config(method, compute_dtype=compute_dtype, skip_modules=skip_modules),
        "dtype": compute_dtype,
    }
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": dist.device_index()}
    return kwargs
