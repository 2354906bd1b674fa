"""The cascade baseline of the audio-LLM recipe: Whisper's zero-shot transcript read by the same LLM, tuned with
LoRA on gold transcripts for the same tasks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modaltune.audio.data import Clip
from modaltune.audio.eval import score, transcribe
from modaltune.audio.task_eval import score_rows
from modaltune.audio.whisper import WhisperASR, WhisperModelConfig, load_whisper
from modaltune.shared import dist
from modaltune.shared.config import ConfigError, doc
from modaltune.shared.generation import DecodingConfig, TokenPrompts, generate
from modaltune.shared.lm import build_text_model
from modaltune.shared.sequences import encode_prompt_target
from modaltune.shared.peft import ComponentConfig
from modaltune.shared.training import StagePlan, compute_dtype, run_stages
from modaltune.text.data import PadCollator


@dataclasses.dataclass
class CascadeConfig:
    """The cascade baseline: Whisper's zero-shot transcript -> the same LLM tuned on gold transcripts."""

    enabled: bool = doc(True, "measure it (zero-shot Whisper WER and the cascade's extraction scores)")
    max_steps: int = doc(80, "LoRA steps of the text-only LLM on gold transcripts")
    lr: float = doc(5.0e-4, "its learning rate")
    language: str = doc("en", "multilingual Whisper models: the spoken language")
    whisper: DecodingConfig = doc(help="Whisper's decoding of the zero-shot transcripts (answer length capped at "
                                       "the model's decoder length less 8)",
                                  factory=lambda: DecodingConfig(num_beams=4, batch_size=16, max_new_tokens=128))
    llm: DecodingConfig = doc(help="the tuned LLM's decoding of its answers",
                              factory=lambda: DecodingConfig(batch_size=16, max_new_tokens=48))

    def validate(self, where: str) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"{where}.max_steps must be at least 1")


def cascade_rows(rows: list[dict[str, Any]], transcripts: dict[str, str]) -> list[dict[str, Any]]:
    """Text-only versions of non-transcription rows: the clip's transcript (gold, or Whisper's) in the prompt."""
    out = []
    for r in rows:
        if r["task"] == "transcribe" or r["input"] not in transcripts:
            continue
        instruction = r["prompt"].split("</audio>", 1)[1].replace(" [/INST]", "").strip()
        out.append({**r, "prompt": f"[INST] Transcript: {transcripts[r['input']]}\n{instruction} [/INST]"})
    return out


def zero_shot_transcripts(cfg: CascadeConfig, clips: list[Clip], whisper_name: str, *, precision: str,
                          log: Callable[[str], None] = print) -> list[str]:
    """Whisper's zero-shot transcripts of ``clips`` (the model frozen, decoded by ``cfg.whisper``); rank 0 decodes
    under a launcher and every rank gets them."""
    frozen = ComponentConfig(method="frozen")
    hf, processor, source = load_whisper(WhisperModelConfig(name=whisper_name, language=cfg.language),
                                         encoder=frozen, decoder=frozen, log_fn=log)
    whisper = WhisperASR(hf, pad_token_id=processor.tokenizer.pad_token_id,
                         decoder_start_token_id=hf.config.decoder_start_token_id)
    spoken = cfg.language if source["multilingual"] else None
    decode = dataclasses.replace(cfg.whisper, max_new_tokens=min(cfg.whisper.max_new_tokens,
                                                                 hf.config.max_target_positions - 8))
    texts, _ = dist.on_main(lambda: transcribe(
        whisper, processor, [c.wave for c in clips], decode, precision=precision, language=spoken,
        task="transcribe" if spoken else None, cache=None, prompt=None, desc="cascade: zero-shot Whisper"))
    return texts


def cascade(*, model_cfg, llm_cfg, train_cfg, cfg: CascadeConfig, train_rows: list[dict], test_rows: list[dict],
            clips: dict[str, Clip], whisper_name: str, normalizer, run_dir: Path, precision: str,
            log: Callable[[str], None] = print) -> tuple[dict[str, float], list[dict]]:
    """Zero-shot Whisper transcripts of the test clips (``test/wer``), then the LLM with a fresh LoRA tuned on the
    gold transcripts of ``train_rows`` for their tasks, reading those transcripts (``orders/*``, ...).

    Under a launcher every rank calls this: the tuning is data-parallel, the transcription and generation run on
    rank 0 (:func:`modaltune.shared.dist.on_main`)."""
    test_ids = list(dict.fromkeys(r["input"] for r in test_rows))
    heard = dict(zip(test_ids, zero_shot_transcripts(cfg, [clips[i] for i in test_ids], whisper_name,
                                                     precision=precision, log=log)))
    refs = [r for r in test_rows if r["task"] == "transcribe"]
    metrics: dict[str, float] = {}
    if refs:
        got = score([heard[r["input"]] for r in refs], [r["target"] for r in refs], 0.0, 1.0, normalizer=normalizer,
                    terms=[])
        metrics.update({"test/wer": got["wer"], "test/cer": got["cer"], "test/wer_raw": got["wer_raw"]})
    gold = cascade_rows(train_rows, {c.id: c.text for c in clips.values()})
    tests = cascade_rows(test_rows, heard)
    items = [{"id": r["id"], "task": "transcribe", "reference": r["target"], "prediction": heard[r["input"]]}
             for r in refs]
    if not gold or not tests:
        return metrics, items
    model, tok, _ = build_text_model(model_cfg, llm_cfg, compute_dtype=compute_dtype(precision), log_fn=log)

    train = [{"input_ids": e.input_ids, "labels": e.labels}
             for e in (encode_prompt_target(tok, r["prompt"], " " + r["target"]) for r in gold)]
    plan = StagePlan("cascade", train, None, max_steps=cfg.max_steps, lr=cfg.lr)
    run_stages(model, [plan], dataclasses.replace(train_cfg, resume=False, save_steps=10**9, eval_steps=0),
               run_dir=run_dir / "cascade", collator=PadCollator(tok.pad_token_id), component_lrs={},
               checkpoint_meta={"recipe": "audio-llm cascade baseline"}, log=log)
    prompts = TokenPrompts([tok(r["prompt"], add_special_tokens=True)["input_ids"] for r in tests], tok)
    answers = dist.on_main(lambda: generate(model, tok, prompts, cfg.llm, precision=precision,
                                            desc="cascade: extraction"))
    more, rows = score_rows(tests, answers, normalizer=normalizer, seconds={})
    metrics.update({k: v for k, v in more.items() if not k.startswith("test/")})
    model = None
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return metrics, items + rows
