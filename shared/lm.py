"""Causal LMs: loading (local folder, hub id, zoo name, GGUF file), tokenizer and the trainable wrapper."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import torch

from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.loss import causal_lm_loss, check_label_logits
from modaltune.shared.model import ModaltuneModel
from modaltune.shared.peft import ComponentConfig, ComponentSpec, apply_peft, get_method, method_of
from modaltune.shared.quant import quantized_load_kwargs
from modaltune.shared.zoo import hub_error, load_error, resolve_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class ModelConfig:
    """Which causal LM to load and how."""

    name: str = doc("gemma-3-270m", "zoo name, local folder or Hugging Face hub id")
    gguf_file: str | None = doc(None, "GGUF file inside the folder/repo to dequantise and load")
    revision: str | None = doc(None, "hub revision (branch, tag or commit)")
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "dtype of the loaded (non-quantised) weights")
    trust_remote_code: bool = doc(False, "run model code shipped with a hub repo (off: only transformers' own code)")
    template: Literal["auto", "chat", "plain"] = doc("auto", "prompt format: the model's chat template if it has one")


def load_tokenizer(path: str, cfg: ModelConfig):
    """The model's tokenizer, with a pad token (falls back to EOS)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            path, gguf_file=cfg.gguf_file, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise hub_error(cfg.name, exc) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise ModaltuneError(f"the tokenizer of {cfg.name!r} has no end-of-sequence token; cannot train responses")
    return tok


def load_causal_lm(cfg: ModelConfig, *, method: str | None = None, compute_dtype: torch.dtype = torch.float32,
                   quantize_head: bool = False, log_fn=print):
    """Load the causal LM (quantised when the PEFT ``method`` named asks for it, e.g. QLoRA) and its tokenizer.

    Returns:
        ``(model, tokenizer, source)`` where ``source`` says where the weights came from.
    """
    from transformers import AutoModelForCausalLM

    path, kind = resolve_model(cfg.name, log=log_fn, revision=cfg.revision)
    kwargs: dict[str, Any] = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": DTYPES[cfg.dtype],
    }
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    if method is not None and get_method(method).quantised:
        skip = [] if quantize_head else ["lm_head"]
        kwargs.update(quantized_load_kwargs(method, compute_dtype=compute_dtype, skip_modules=skip))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise load_error(cfg.name, kind, path, "causal LM", exc) from None
    if cfg.gguf_file and getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # GGUF is dequantised on load
        model.hf_quantizer = None
    tok = load_tokenizer(path, cfg)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, {"name": cfg.name, "kind": kind, "path": path}


class CausalLMModel(ModaltuneModel):
    """A causal LM (one component, ``llm``) whose loss runs the output layer only at labelled positions."""

    def __init__(self, llm: torch.nn.Module, *, label_logits_only: bool = True) -> None:
        super().__init__()
        self.llm = llm
        self.components = {"llm": "llm"}
        self.label_logits_only = label_logits_only

    @property
    def config(self):
        return self.llm.config

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        num_items = kwargs.pop("num_items_in_batch", None)
        if labels is None:
            return self.llm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # packed rows come with position_ids and no mask (see text.data.PackedDataset)
        extra = {"position_ids": kwargs["position_ids"]} if kwargs.get("position_ids") is not None else {}
        if kwargs.get("per_row"):  # each row's summed loss (preference training)
            extra["per_row"] = True
        loss = causal_lm_loss(
            self.llm,
            labels=labels,
            label_logits_only=self.label_logits_only,
            num_items_in_batch=num_items,
            input_ids=input_ids,
            attention_mask=attention_mask,
            **extra,
        )
        return {"loss": loss}

    def generate(self, **kwargs):
        return self.llm.generate(**kwargs)


def build_text_model(model_cfg: ModelConfig, llm_cfg: ComponentConfig, *, compute_dtype: torch.dtype,
                     label_logits_only: bool = True, log_fn=print):
    """Load the LM, apply the ``llm`` component's method and wrap it; returns ``(model, tokenizer, source)``."""
    method = method_of(llm_cfg)
    if not method.trains:
        raise ConfigError(f"llm.method is {llm_cfg.method!r}: nothing would train; pick lora, qlora, dora, ia3, ... "
                          "or full")
    lm, tok, source = load_causal_lm(
        model_cfg, method=llm_cfg.method, compute_dtype=compute_dtype, quantize_head=llm_cfg.quantize_head,
        log_fn=log_fn,
    )
    method.prepare(lm, llm_cfg, source["path"])
    lm = apply_peft(lm, [ComponentSpec("llm", "", llm_cfg)])
    model = CausalLMModel(lm, label_logits_only=label_logits_only)
    model.record_trained(full_components=["llm"] if method.full_weights else [])
    if label_logits_only:
        diff = check_label_logits(lm, lm.config.vocab_size if hasattr(lm.config, "vocab_size") else 1000,
                                  device=model.device)
        if diff > 1e-3:
            log_fn(f"label-only logits differ from full logits by {diff:.2e} for this architecture; "
                   "using full logits")
            model.label_logits_only = False
    return model, tok, source
