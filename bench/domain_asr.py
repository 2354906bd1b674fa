"""Benchmark: domain-asr training step and evaluation speed against plain transformers + peft Whisper.

Same model (whisper-tiny.en by default), decoder LoRA config, clips and labels (the first clips of the built-in
dictation set). Ratios are against baselines measured in the same run:

- training step: plain loop (``model(input_features, labels)``, frozen encoder run every step, fp32) vs
  modaltune without the cache (encoder every step, recipe precision) vs modaltune with cached encoder states;
- evaluation: real-time factor of plain ``generate(input_features)`` vs modaltune's ``transcribe`` (log-mel,
  encoder and decoding all counted).

    python bench/domain_asr.py [--model whisper-tiny.en] [--batch-size 16] [--steps 3] [--clips 32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="whisper-tiny.en")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--clips", type=int, default=32, help="clips decoded for the RTF comparison")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import peft
    import torch
    from transformers import WhisperForConditionalGeneration

    from modaltune.audio.eval import audio_seconds, transcribe
    from modaltune.audio.features import ASRCollator, ASRDataset, EncoderCache, log_mel
    from modaltune.audio.io import load_audio
    from modaltune.audio.whisper import label_ids
    from modaltune.shared.config import load_config
    from modaltune.shared.recipe import get_recipe

    recipe = get_recipe("domain-asr")
    cfg = load_config(recipe.config_cls, recipe.default_config_path(), [f"model.name={args.model}"])
    manifests = recipe.builtin_manifests(cfg)  # the recipe's own built-in set (built once, then reused)
    rows = [json.loads(x) for x in Path(manifests["train"]).read_text().splitlines()]
    need = args.batch_size * (args.steps + 1)
    waves = [load_audio(Path(manifests["train"]).parent / r["audio"]) for r in rows[: max(need, args.clips)]]
    texts = [r["text"] for r in rows[: len(waves)]]

    model, processor, source, precision = recipe.build(cfg)
    labels = [label_ids(processor, t) for t in texts]
    collate = ASRCollator()
    results: dict[str, dict] = {}

    def timed_steps(name, batches, forward, params):
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for batch in batches:
            t = time.perf_counter()
            loss = forward(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
        results[name] = {"step_seconds": sum(times[1:]) / len(times[1:])}
        print(f"measured {name}: {results[name]['step_seconds']:.3f} s/step", flush=True)

    def chunks(ds):
        return [collate([ds[i] for i in range(k * args.batch_size, (k + 1) * args.batch_size)])
                for k in range(args.steps + 1)]

    # plain transformers + peft: the encoder runs every step
    plain = WhisperForConditionalGeneration.from_pretrained(source["path"])
    lora = cfg.decoder
    plain = peft.get_peft_model(plain, peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                       target_modules=r".*decoder.*\.(" + "|".join(lora.targets) + ")"))
    plain.train()
    plain_ds = ASRDataset(waves[:need], labels[:need], processor)
    timed_steps("plain", chunks(plain_ds), lambda b: plain(input_features=b["input_features"], labels=b["labels"]).loss,
                [q for q in plain.parameters() if q.requires_grad])

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    trainable = [q for q in model.parameters() if q.requires_grad]
    model.train()

    def ours(batch):
        with autocast:
            return model(**batch)["loss"]

    timed_steps("modaltune-uncached", chunks(plain_ds), ours, trainable)
    t = time.perf_counter()
    cache = EncoderCache(model, processor, batch_size=args.batch_size, autocast_dtype=recipe.autocast_dtype(cfg))
    cached_ds = ASRDataset(waves[:need], labels[:need], processor, cache=cache)
    fill = time.perf_counter() - t
    timed_steps("modaltune-cached", chunks(cached_ds), ours, trainable)
    results["modaltune-cached"]["cache_fill_seconds_per_clip"] = fill / need

    # evaluation RTF
    eval_waves = waves[: args.clips]
    secs = audio_seconds(eval_waves)
    model.eval()
    base = model.whisper.get_base_model() if hasattr(model.whisper, "get_base_model") else model.whisper
    t = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(eval_waves), cfg.eval.batch_size):
            feats = log_mel(processor, eval_waves[k : k + cfg.eval.batch_size])
            base.generate(input_features=feats, max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                          num_beams=cfg.eval.num_beams)  # the recipe's decoding on both sides
    plain_rtf = (time.perf_counter() - t) / secs
    ev_cache = EncoderCache(model, processor, batch_size=cfg.eval.batch_size, autocast_dtype=recipe.autocast_dtype(cfg))
    _, seconds = transcribe(model, processor, eval_waves, cfg.eval, language=None, task=None, cache=ev_cache)
    results["eval"] = {"plain_generate_rtf": plain_rtf, "modaltune_rtf": seconds / secs}

    base_step = results["plain"]["step_seconds"]
    print(f"\ndomain-asr benchmark: {args.model}, batch {args.batch_size}, {args.steps} timed steps, "
          f"decoder LoRA r={lora.r}, recipe precision {precision}")
    print(f"{'training step':22s} {'s/step':>8s} {'x plain':>8s}")
    for name in ("plain", "modaltune-uncached", "modaltune-cached"):
        s = results[name]["step_seconds"]
        print(f"{name:22s} {s:8.3f} {s / base_step:8.3f}")
    print(f"(cache fill: {results['modaltune-cached']['cache_fill_seconds_per_clip']:.3f} s per clip, once per clip "
          "and view, reused every epoch and every evaluation)")
    ev = results["eval"]
    print(f"\n{'evaluation':22s} {'RTF':>8s} {'x plain':>8s}")
    print(f"{'plain generate':22s} {ev['plain_generate_rtf']:8.3f} {1.0:8.3f}")
    print(f"{'modaltune transcribe':22s} {ev['modaltune_rtf']:8.3f} {ev['modaltune_rtf'] / ev['plain_generate_rtf']:8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
