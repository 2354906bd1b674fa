"""Virtual-token methods of a whole causal LM: ``prompt_tuning`` and ``prefix_tuning``.

They prepend trainable tokens instead of changing weights, so they apply to a causal LM on its own (not to an
encoder, nor to an LLM that takes spliced encoder tokens), take no ``layers`` and have nothing to merge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.peft.base import PeftMethod, register_method

if TYPE_CHECKING:  # type hints only
    from modaltune.shared.peft.config import ComponentConfig, ComponentSpec


class VirtualTokens(PeftMethod):
    """Trainable virtual tokens in front of every input of a causal LM."""

    virtual_tokens = True

    def validate(self, cfg: ComponentConfig, where: str) -> None:
        if cfg.layers is not None:
            raise ConfigError(f"{where}.layers does not apply to {cfg.method} (it adds virtual tokens, not "
                              "per-block weights)")

    def merge_substitute(self, where: str) -> str:
        raise ModaltuneError(f"{where}.method={self.name} adds virtual tokens that cannot be merged into weights; "
                             f"load the checkpoint's adapter folder with peft instead")

    def wrap(self, model: nn.Module, specs: list[ComponentSpec], *, causal_lm: bool) -> nn.Module:
        import peft  # lazy: peft is imported when a model is built, not when a config is read

        if not causal_lm or len(specs) != 1 or specs[0].root:
            raise ConfigError(f"{self.name} applies to a whole causal LM component, not to {specs[0].name!r}")
        return peft.get_peft_model(model, self.peft_config(model, specs))


class PromptTuning(VirtualTokens):
    """Trainable virtual-token embeddings (optionally initialised from ``prompt_init_text``)."""

    name, adapter_kind = "prompt_tuning", "prompt_tuning"
    help = "trainable virtual-token embeddings (causal LM component only)"

    def prepare(self, model: nn.Module, cfg: ComponentConfig, path: str) -> None:
        if cfg.prompt_init_text:  # the init text is tokenised with the tokenizer of the folder the model came from
            model.config._name_or_path = path

    def peft_config(self, model: nn.Module, specs: list[ComponentSpec]) -> Any:
        import peft  # lazy: as above

        cfg = specs[0].config
        init = peft.PromptTuningInit.TEXT if cfg.prompt_init_text else peft.PromptTuningInit.RANDOM
        tok_path = getattr(model.config, "_name_or_path", None)
        return peft.PromptTuningConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=init,
            prompt_tuning_init_text=cfg.prompt_init_text,
            tokenizer_name_or_path=tok_path if cfg.prompt_init_text else None,
        )


class PrefixTuning(VirtualTokens):
    """Trainable per-layer key/value prefixes."""

    name, adapter_kind = "prefix_tuning", "prefix_tuning"
    help = "trainable per-layer key/value prefixes (causal LM component only)"

    def peft_config(self, model: nn.Module, specs: list[ComponentSpec]) -> Any:
        import peft  # lazy: as above

        return peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM,
                                       num_virtual_tokens=specs[0].config.num_virtual_tokens)


register_method(PromptTuning())
register_method(PrefixTuning())
