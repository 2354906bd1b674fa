"""The composition core: encoder -> token grouping -> projector -> splice -> causal LM, as a transformers model.

The encoder (image or speech) yields ``(B, N, D_enc)`` tokens; :func:`group_tokens` concatenates ``k`` consecutive
tokens into one (``(B, N/k, k*D_enc)``), a projector maps them into the LM's embedding space
(:mod:`~modaltune.shared.compose.projectors`), and :func:`splice` puts them into the prompt at the placeholder
position through ``inputs_embeds``. Rows may be left- or right-padded: each row carries its own placeholder
position. The loss is the core's label-position-only loss.

:class:`ComposedLM` is a :class:`~transformers.PreTrainedModel` with its own :class:`ComposedConfig`:
``save_pretrained`` writes the config (encoder, projector, the LLM's own config) and every weight, and
``from_pretrained`` (or ``AutoModel.from_pretrained`` once :mod:`modaltune.shared.compose` is imported) rebuilds the
three parts from the config alone and loads them, with no download and no remote code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec

from modaltune.shared.compose.parts import EncoderConfig, ProjectorConfig, build_encoder, build_projector
from modaltune.shared.compose.projectors import ProjectorOutput
from modaltune.shared.config import from_dict
from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.loss import IGNORE_INDEX, causal_lm_loss, unwrap_peft
from modaltune.shared.model import ModaltuneModel


def group_tokens(tokens: torch.Tensor, k: int, mode: Literal["pad", "trim"] = "pad") -> torch.Tensor:
    """Concatenate ``k`` consecutive tokens: ``(B, N, D) -> (B, ceil(N/k) or floor(N/k), k*D)``.

    A length not divisible by ``k`` is zero-padded at the end (``pad``) or cut (``trim``).

    Example:
        >>> group_tokens(torch.arange(10.).view(1, 5, 2), 2, "pad").shape
        torch.Size([1, 3, 4])
    """
    if k < 1:
        raise ConfigError(f"token grouping k must be at least 1, got {k}")
    if k == 1:
        return tokens
    b, n, d = tokens.shape
    rest = n % k
    if rest:
        if mode == "trim":
            if n < k:
                raise ConfigError(f"cannot trim {n} tokens to groups of {k}: use grouping mode 'pad'")
            tokens = tokens[:, : n - rest]
        else:
            tokens = torch.cat([tokens, tokens.new_zeros(b, k - rest, d)], dim=1)
    return tokens.reshape(b, -1, k * d)  # (B, N/k, k*D)


def token_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, n)`` bool: the first ``lengths[b]`` tokens of each row are real.

    Example:
        >>> token_mask(torch.tensor([1, 3]), 3).tolist()
        [[True, False, False], [True, True, True]]
    """
    return torch.arange(n, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def splice(embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None, positions: torch.Tensor,
           inserted: torch.Tensor, inserted_mask: torch.Tensor | None = None, *,
           left: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace the placeholder token at ``positions[b]`` of each row with that row's ``inserted`` tokens.

    Args:
        embeds: prompt embeddings, ``(B, T, D)``.
        mask: attention mask, ``(B, T)``.
        labels: labels or ``None``, ``(B, T)``; inserted positions get ``-100``.
        positions: placeholder index per row, ``(B,)``.
        inserted: tokens to insert, ``(B, M, D)``.
        inserted_mask: ``(B, M)`` bool, which of a row's tokens are real (clips of different lengths); None: all.
        left: rows that come out shorter than the longest are padded on the left (generation), else on the right.

    Returns:
        ``(embeds, mask, labels)``; every row holds ``T - 1`` prompt positions plus its real inserted tokens,
        padding stays where it was and rows shorter than the longest get more of it.

    Example:
        >>> e, m, _ = splice(torch.zeros(2, 3, 1), torch.ones(2, 3, dtype=torch.long), None, torch.tensor([1, 1]),
        ...                  torch.ones(2, 2, 1), torch.tensor([[True, True], [True, False]]), left=True)
        >>> m.tolist()
        [[1, 1, 1, 1], [0, 1, 1, 1]]
    """
    b, t, _ = embeds.shape
    if positions.shape != (b,) or bool(((positions < 0) | (positions >= t)).any()):
        raise ModaltuneError("every prompt needs exactly one placeholder (image, audio) inside it")
    rows_e, rows_m, rows_l = [], [], []
    for i in range(b):
        p = int(positions[i])
        tokens = inserted[i] if inserted_mask is None else inserted[i][inserted_mask[i]]  # (M_i, D)
        n = tokens.size(0)
        rows_e.append(torch.cat([embeds[i, :p], tokens.to(embeds.dtype), embeds[i, p + 1 :]]))
        rows_m.append(torch.cat([mask[i, :p], mask.new_ones(n), mask[i, p + 1 :]]))
        if labels is not None:
            rows_l.append(torch.cat([labels[i, :p], labels.new_full((n,), IGNORE_INDEX), labels[i, p + 1 :]]))
    if inserted_mask is None:
        return (torch.stack(rows_e), torch.stack(rows_m), torch.stack(rows_l) if labels is not None else None)
    width = max(r.size(0) for r in rows_e)

    def pad(rows: list[torch.Tensor], value) -> torch.Tensor:
        out = []
        for r in rows:
            fill = r.new_full((width - r.size(0), *r.shape[1:]), value)
            out.append(torch.cat([fill, r] if left else [r, fill]))
        return torch.stack(out)

    return pad(rows_e, 0.0), pad(rows_m, 0), pad(rows_l, IGNORE_INDEX) if labels is not None else None


@dataclasses.dataclass(frozen=True)
class EncoderBatch:
    """The encoder side of a batch, under the collator's keys: the encoder's own inputs (``encoder_inputs``:
    pixels, log-mel features) or states from a :class:`~modaltune.shared.features.FeatureCache` (``features``,
    ``(B, N, D_enc)``, taken at ``features_depth``; None: the encoder output), and how many encoder tokens of each
    row hold its input (``features_lengths``, ``(B,)``: clips of different lengths; None: all)."""

    encoder_inputs: torch.Tensor | None = None
    features: torch.Tensor | None = None
    features_depth: int | None = None
    features_lengths: torch.Tensor | None = None

    @classmethod
    def take(cls, batch: dict[str, Any]) -> EncoderBatch:
        """The encoder keys of ``batch``, popped out of it."""
        return cls(**{f.name: batch.pop(f.name) for f in dataclasses.fields(cls) if f.name in batch})


@dataclasses.dataclass(frozen=True)
class Readings:
    """Tokens given with a training batch that stand in for the projector's own on some rows: word tokens another
    reader gave each input (:func:`~modaltune.shared.compose.heldout.heldout_readings`).

    Attributes:
        readings: ``(B, R, D)`` the given tokens, zero-padded.
        readings_lengths: ``(B,)`` how many of each row's are real.
        readings_rows: ``(B,)`` bool, the rows that have them (None: all); the others keep the projector's own.
    """

    readings: torch.Tensor
    readings_lengths: torch.Tensor
    readings_rows: torch.Tensor | None = None

    @classmethod
    def take(cls, batch: dict[str, Any]) -> Readings | None:
        """The readings of ``batch`` (popped out of it), or None when it has none."""
        given = {f.name: batch.pop(f.name) for f in dataclasses.fields(cls) if f.name in batch}
        return cls(**given) if given.get("readings") is not None else None

    def substitute(self, prefix: torch.Tensor, shown: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens to splice and which are real: the readings on their rows, ``prefix`` (``shown``) elsewhere."""
        readings = self.readings.to(prefix.device, prefix.dtype)  # (B, R, D)
        given = token_mask(self.readings_lengths.to(prefix.device), readings.size(1))  # (B, R)
        if self.readings_rows is None:
            return readings, given
        own = shown if shown is not None else torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
        width = max(prefix.size(1), readings.size(1))
        widen = lambda t, value: nn.functional.pad(t, (0, 0, 0, width - t.size(1)) if t.dim() == 3  # noqa: E731
                                                   else (0, width - t.size(1)), value=value)
        use = self.readings_rows.to(prefix.device)
        return (torch.where(use[:, None, None], widen(readings, 0.0), widen(prefix, 0.0)),
                torch.where(use[:, None], widen(given, False), widen(own, False)))


class ComposedConfig(PreTrainedConfig):
    """How a :class:`ComposedLM` is put together: enough to rebuild every part's architecture without weights.

    Attributes:
        encoder: the :class:`~modaltune.shared.compose.parts.EncoderConfig` fields.
        encoder_architecture: what the encoder's ``architecture()`` returned (its builder rebuilds it from this).
        projector: the :class:`~modaltune.shared.compose.parts.ProjectorConfig` fields.
        text_config: the causal LLM's config (in a model, the LLM's own config object). Give a copy (a dict) when
            making one: a config object given here has its attention implementation reset.
        label_logits_only: the output layer runs only at answer positions.
        encoder_train_mode: the encoder follows ``train()`` (fully trained); else it stays in eval mode.
        template: the prompt template the model was trained with (``{instruction}`` or ``{question}``).
        placeholder: the placeholder string in that template where the encoder tokens go.
    """

    model_type = "modaltune_composed"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="gemma3_text")}

    encoder: dict | None = None
    encoder_architecture: dict | None = None
    projector: dict | None = None
    text_config: dict | PreTrainedConfig | None = None
    label_logits_only: bool = True
    encoder_train_mode: bool = False
    template: str | None = None
    placeholder: str | None = None

    @property
    def use_cache(self) -> bool:
        """The LLM's ``use_cache`` (the Trainer sets it on the model's config)."""
        return getattr(self.text_config, "use_cache", True)

    @use_cache.setter
    def use_cache(self, value: bool) -> None:
        self.text_config.use_cache = value


def rebuild_parts(config: ComposedConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(encoder, projector, llm)`` of ``config``'s architecture, with no weights loaded (``from_pretrained`` fills
    them from the saved state)."""
    if not config.encoder_architecture:
        raise ModaltuneError("this composed config names no encoder architecture: its encoder cannot be rebuilt")
    encoder = build_encoder(from_dict(EncoderConfig, config.encoder, where="config.encoder"),
                            architecture=config.encoder_architecture)
    llm = AutoModelForCausalLM.from_config(config.text_config)
    cfg = from_dict(ProjectorConfig, config.projector, where="config.projector")
    hidden = llm.get_input_embeddings().embedding_dim
    projector = build_projector(cfg.kind, in_dim=encoder.out_dim, out_dim=hidden, group=cfg.group, norm=cfg.norm,
                                scale=1.0, words=torch.zeros(cfg.anchor_words, hidden) if cfg.uses_words else None,
                                blank=cfg.uses_words and cfg.grounding == "ctc", collapse=cfg.collapse)
    return encoder, projector, llm


class ComposedLM(PreTrainedModel, ModaltuneModel):
    """``encoder -> grouping -> projector -> causal LM``; components ``encoder``, ``projector``, ``llm``.

    ``forward(**batch)`` takes ``input_ids``/``attention_mask`` with one placeholder per row at
    ``placeholder_positions``, the encoder side of the batch (:class:`EncoderBatch`'s keys), and in training
    optionally ``labels``, ``ground_words`` (``(B,)`` bool: rows whose target describes their input, for the
    projector's grounding loss), :class:`Readings`' keys and ``objective="grounding"`` (the projector's grounding
    loss alone: the LLM does not run).

    Args:
        config: how the parts fit; alone (``from_pretrained``), the parts are rebuilt from it.
        encoder: a :class:`~modaltune.shared.features.CachedEncoder` module, when built from parts.
        projector: the projector (see :func:`~modaltune.shared.compose.parts.build_projector`).
        llm: the causal LM (possibly PEFT-wrapped).
    """

    config_class = ComposedConfig
    main_input_name = "input_ids"
    activation_checkpointing_enable = ModaltuneModel.activation_checkpointing_enable  # not transformers' own

    def __init__(self, config: ComposedConfig, *, encoder: nn.Module | None = None,
                 projector: nn.Module | None = None, llm: nn.Module | None = None) -> None:
        super().__init__(config)
        if encoder is None or projector is None or llm is None:
            encoder, projector, llm = rebuild_parts(config)
        p = from_dict(ProjectorConfig, config.projector, where="config.projector")
        self.word_grounding = p.word_grounding if p.uses_words else 0.0  # weight of the projector's grounding loss
        self.encoder = encoder
        self.encoder_train_mode = config.encoder_train_mode
        self.projector = projector
        self.llm = llm
        # the LLM's own config object: what is set on the composed config (the Trainer's use_cache) reaches the LLM
        self.config.text_config = unwrap_peft(llm).config
        self.group = p.group
        self.group_mode = p.group_mode
        self.label_logits_only = config.label_logits_only
        self.components = {"encoder": "encoder", "projector": "projector", "llm": "llm"}
        self.post_init()

    def init_weights(self) -> None:
        """Nothing to draw: the parts come initialised by their own builders, or get a saved state."""

    def _init_weights(self, module: nn.Module) -> None:
        """A rebuilt part's non-persistent buffers (a saved state holds everything else)."""
        init = getattr(module, "init_buffers", None)
        if callable(init):
            init()

    def train(self, mode: bool = True):
        """Train mode everywhere but in the encoder, unless it is fully trained: a frozen or adapter-tuned encoder
        keeps its normalisation statistics and drops no paths, so it computes what its feature cache holds."""
        super().train(mode)
        if mode and not self.encoder_train_mode:
            self.encoder.eval()
        return self

    def prefix_tokens(self, **encoder_batch: Any) -> torch.Tensor:
        """Projected encoder tokens ``(B, M, D_llm)`` of inputs whose every encoder token is real (see
        :meth:`project`; keyword arguments: :class:`EncoderBatch`'s fields)."""
        return self.project(EncoderBatch(**encoder_batch)).tokens

    def project(self, batch: EncoderBatch) -> ProjectorOutput:
        """What the projector makes of a batch's encoder side, with ``real`` (``(B, M)`` bool: which projected
        tokens hold the input; None: all) set.

        Cached ``features`` taken at a depth go through the encoder's remaining blocks first. Encoder tokens past a
        row's ``features_lengths`` are padding and are not projected into the prompt.
        """
        features, lengths = batch.features, batch.features_lengths
        if features is None:
            if batch.encoder_inputs is None:
                raise ModaltuneError("ComposedLM needs encoder_inputs or cached features")
            features = self.encoder(batch.encoder_inputs)  # (B, N, D_enc)
        elif batch.features_depth is not None:
            rest, depth = unwrap_peft(self.encoder).encode_rest, int(batch.features_depth)
            if lengths is None:
                features = rest(features, depth)  # (B, N, D_enc)
            else:  # each row on its own real tokens: the blocks above see no padding
                features = torch.cat([nn.functional.pad(rest(features[i : i + 1, : int(n)], depth),
                                                        (0, 0, 0, features.size(1) - int(n)))
                                      for i, n in enumerate(lengths)])
        proj_dtype = next(self.projector.parameters()).dtype
        if lengths is None:
            grouped = group_tokens(features, self.group, self.group_mode)  # (B, N/k, k*D_enc)
            return self._projected(grouped.to(proj_dtype))  # (B, M, D_llm)
        lengths = lengths.to(features.device).clamp(max=features.size(1))
        features = features * token_mask(lengths, features.size(1)).unsqueeze(-1).to(features.dtype)  # zero padding
        grouped = group_tokens(features, self.group, self.group_mode)  # (B, M, k*D_enc)
        counts = lengths // self.group if self.group_mode == "trim" else -(-lengths // self.group)  # ceil
        out = self._projected(grouped.to(proj_dtype))  # (B, r*M, D_llm): r blocks of M tokens (norm=both: r=2)
        blocks = out.tokens.size(1) // grouped.size(1)
        out.real = token_mask(counts.clamp(min=1), grouped.size(1)).repeat(1, blocks)
        return out

    def _projected(self, grouped: torch.Tensor) -> ProjectorOutput:
        out = self.projector(grouped)
        return out if isinstance(out, ProjectorOutput) else ProjectorOutput(out)

    def embed(self, input_ids, attention_mask, placeholder_positions, labels=None, *, left: bool = False,
              **encoder_batch: Any):
        """``(embeds, mask, labels)``: prompt embeddings with the projected tokens spliced in (shorter rows padded
        on the ``left`` or right); keyword arguments: :class:`EncoderBatch`'s fields."""
        return self._embed(input_ids, attention_mask, placeholder_positions, labels, EncoderBatch(**encoder_batch),
                           left=left)[:3]

    def _embed(self, input_ids, attention_mask, placeholder_positions, labels, batch: EncoderBatch, *,
               left: bool = False, readings: Readings | None = None):
        lm = unwrap_peft(self.llm)
        embeds = lm.get_input_embeddings()(input_ids)  # (B, T, D); Gemma scales inside this lookup
        out = self.project(batch)  # (B, M, D)
        prefix, shown = out.tokens, self._shown(out)
        if readings is not None:  # given readings stand in for the projector's own tokens on the rows that have
            # one; the projector still ran above, so its grounding loss sees every input
            prefix, shown = readings.substitute(prefix, shown)
        return (*splice(embeds, attention_mask, labels, placeholder_positions, prefix, shown, left=left), out)

    @staticmethod
    def _shown(out: ProjectorOutput) -> torch.Tensor | None:
        """Which projected tokens go into the prompt: the real ones, less those the projector does not show (at
        least one token per row is kept)."""
        if out.shown is None:
            return out.real
        prefix = out.tokens
        kept = out.shown.to(prefix.device)  # (B, M): the first M tokens
        shown = (out.real.clone() if out.real is not None
                 else torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device))  # (B, r*M)
        m = kept.size(1)
        shown[:, :m] &= kept
        empty = ~shown.any(dim=1)
        shown[empty, 0] = True  # nothing read and nothing else: one (blank) token keeps the row well formed
        return shown

    def forward(self, input_ids, attention_mask, placeholder_positions, labels=None, objective=None, **batch):
        num_items = batch.pop("num_items_in_batch", None)
        per_row = bool(batch.pop("per_row", False))  # each row's summed loss (preference training)
        ground_words = batch.pop("ground_words", None)
        readings = Readings.take(batch)
        encoded = EncoderBatch(**batch)
        if objective == "grounding":  # the projector's grounding loss alone: the LLM does not run
            return {"loss": self._grounding_only(labels, ground_words, encoded)}
        embeds, mask, labels, out = self._embed(input_ids, attention_mask, placeholder_positions, labels, encoded,
                                                readings=readings)
        if labels is None:
            return self.llm(inputs_embeds=embeds, attention_mask=mask)
        loss = causal_lm_loss(self.llm, labels=labels, label_logits_only=self.label_logits_only,
                              num_items_in_batch=num_items, inputs_embeds=embeds, attention_mask=mask, per_row=per_row)
        if self.word_grounding and ground_words is not None and self.training and not per_row:
            extra = self.projector.grounding_loss(out, labels, ground_words)
            if extra is not None:
                loss = loss + self.word_grounding * extra
        return {"loss": loss}

    def _grounding_only(self, labels, ground_words, batch: EncoderBatch) -> torch.Tensor:
        if not self.word_grounding or not hasattr(self.projector, "grounding_loss"):
            raise ConfigError("a stage with loss: grounding needs word tokens and a grounding loss: set projector.norm "
                              "to words or both and projector.word_grounding above 0")
        out = self.project(batch)
        rows = (ground_words if ground_words is not None
                else torch.zeros(out.tokens.size(0), dtype=torch.bool, device=out.tokens.device))
        # as in forward, the grounding loss is a training loss (an evaluation pass gives 0)
        extra = self.projector.grounding_loss(out, labels, rows) if labels is not None and self.training else None
        # a batch with nothing to ground still returns a loss that reaches the projector (a zero gradient)
        return self.word_grounding * extra if extra is not None else out.tokens.sum() * 0.0

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, placeholder_positions, **gen_kwargs):
        """Generated token ids (new tokens only) for left-padded prompts; ``gen_kwargs`` carry the encoder side of
        the batch (:class:`EncoderBatch`'s keys) and the LLM's generation settings."""
        embeds, mask, _, _ = self._embed(input_ids, attention_mask, placeholder_positions, None,
                                         EncoderBatch.take(gen_kwargs), left=True)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **gen_kwargs)
