"""Benchmark: domain-asr training step and evaluation speed against plain transformers + peft Whisper.

Same model (whisper-tiny.en by default), decoder LoRA config, clips and labels (the first clips of the built-in
dictation set). Ratios are against baselines measured in the same run:

- training step: plain loop (``model(input_features, labels)``, frozen encoder run every step, fp32) vs
  modaltune without the cache (encoder every step, recipe precision) vs modaltune with cached encoder states;
- evaluation: real-time factor of plain ``generate(input_features)`` vs modaltune's ``transcribe`` (log-mel,
  encoder and decoding all counted).

    python bench/domain_asr.py [--model whisper-tiny.en] [--batch-size 16] [--rounds 3] [--steps 6] [--clips 32]

Each round runs every training step variant, interleaved, on the same batches (``--warmup`` untimed steps, then
``--steps`` timed ones), then both decoders on the same clips. The tables give median times and the median and
range over rounds of each ratio (``bench/timing.py``). The training steps also get their FLOPs a step (counted by
torch's FlopCounterMode), the FLOP/s at the median step time and this machine's matmul peak for their precision,
measured in the same run.
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
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every variant, interleaved")
    p.add_argument("--clips", type=int, default=32, help="clips decoded for the RTF comparison")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1, --warmup at least 0")

    import sys

    import peft
    import torch
    from transformers import WhisperForConditionalGeneration

    from modaltune.audio.eval import audio_seconds, transcribe
    from modaltune.audio.asr import builtin_manifests
    from modaltune.audio.features import ASRCollator, ASRDataset, log_mel
    from modaltune.audio.io import load_audio
    from modaltune.audio.whisper import label_ids
    from modaltune.shared.config import load_config
    from modaltune.shared.features import FeatureCache
    from modaltune.shared.recipe import get_recipe
    from modaltune.shared.training import autocast_dtype, resolve_precision

    sys.path.insert(0, str(Path(__file__).parent))
    from timing import count_flops, summary, table, timed_steps, utilisation_table, utilisations

    recipe = get_recipe("domain-asr")
    cfg = load_config(recipe.config_cls, recipe.default_config_path(), [f"model.name={args.model}"])
    manifests = builtin_manifests(cfg.data)  # the recipe's own built-in set (built once, then reused)
    rows = [json.loads(x) for x in Path(manifests["train"]).read_text().splitlines()]
    need = args.batch_size * (args.warmup + args.steps)
    waves = [load_audio(Path(manifests["train"]).parent / r["audio"]) for r in rows[: max(need, args.clips)]]
    texts = [r["text"] for r in rows[: len(waves)]]

    model, processor, source = recipe.build_model(cfg)
    precision = resolve_precision(cfg.train.precision)
    labels = [label_ids(processor, t) for t in texts]
    collate = ASRCollator()

    def chunks(ds):
        return [collate([ds[i] for i in range(k * args.batch_size, (k + 1) * args.batch_size)])
                for k in range(args.warmup + args.steps)]

    # plain transformers + peft: the encoder runs every step
    plain = WhisperForConditionalGeneration.from_pretrained(source["path"])
    lora = cfg.decoder
    plain = peft.get_peft_model(plain, peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                       target_modules=r".*decoder.*\.(" + "|".join(lora.targets) + ")"))
    plain.train()
    plain_ds = ASRDataset(waves[:need], labels[:need], processor)
    plain_params = [q for q in plain.parameters() if q.requires_grad]

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    trainable = [q for q in model.parameters() if q.requires_grad]
    model.train()

    def ours(batch):
        with autocast:
            return model(**batch)["loss"]

    plain_batches = chunks(plain_ds)
    t = time.perf_counter()
    cache = FeatureCache(model, batch_size=args.batch_size, autocast_dtype=autocast_dtype(precision))
    cached_ds = ASRDataset(waves[:need], labels[:need], processor, cache=cache)
    cached_batches = chunks(cached_ds)  # encoder states: computed once, here
    fill = time.perf_counter() - t

    flops: dict[str, int] = {}

    def steps(forward, params, batches, name):
        opt = torch.optim.AdamW(params, lr=1e-4)
        if name not in flops:  # once: what one step computes
            flops[name] = count_flops(lambda: forward(batches[args.warmup]).backward())
            opt.zero_grad()

        def step(batch):
            forward(batch).backward()
            opt.step()
            opt.zero_grad()

        return timed_steps(step, batches, args.warmup)

    eval_waves = waves[: args.clips]
    secs = audio_seconds(eval_waves)
    base = model.whisper.get_base_model() if hasattr(model.whisper, "get_base_model") else model.whisper

    def plain_decode() -> float:
        model.eval()
        t = time.perf_counter()
        with torch.no_grad():
            for k in range(0, len(eval_waves), cfg.eval.batch_size):
                feats = log_mel(processor, eval_waves[k : k + cfg.eval.batch_size])
                base.generate(input_features=feats, max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                              num_beams=cfg.eval.num_beams)  # the recipe's decoding on both sides
        return (time.perf_counter() - t) / secs

    def our_decode() -> float:
        model.eval()
        ev_cache = FeatureCache(model, batch_size=cfg.eval.batch_size,
                                autocast_dtype=autocast_dtype(precision))  # a fresh cache: encoding is counted
        _, seconds = transcribe(model, processor, eval_waves, cfg.eval, precision=precision, language=None, task=None,
                                cache=ev_cache)
        return seconds / secs

    rounds, rtf = [], []
    for k in range(args.rounds):
        model.train()
        rounds.append({
            "plain": steps(lambda b: plain(input_features=b["input_features"], labels=b["labels"]).loss,
                           plain_params, plain_batches, "plain"),
            "modaltune-uncached": steps(ours, trainable, plain_batches, "modaltune-uncached"),
            "modaltune-cached": steps(ours, trainable, cached_batches, "modaltune-cached"),
        })
        rtf.append({"plain generate": [plain_decode()], "modaltune transcribe": [our_decode()]})
        print(f"round {k + 1}/{args.rounds}: " + ", ".join(f"{n} {sorted(t)[len(t) // 2]:.3f} s/step"
                                                          for n, t in rounds[-1].items())
              + ", RTF " + ", ".join(f"{n} {v[0]:.3f}" for n, v in rtf[-1].items()), flush=True)

    print(table(f"\ndomain-asr benchmark: {args.model}, batch {args.batch_size}, decoder LoRA r={cfg.decoder.r}, "
                f"recipe precision {precision}", rounds, "plain", label="x plain"))
    print(f"(cache fill: {fill / need:.3f} s per clip, once per clip and view, reused every epoch and every "
          "evaluation)")
    print(table(f"\nevaluation on {len(eval_waves)} clips ({secs:.0f} s of audio), beam {cfg.eval.num_beams} on both "
                "sides; real-time factor (log-mel, encoder and decoding counted)", rtf, "plain generate", unit="RTF",
                label="x plain", what="pass over the clips per variant"))
    precisions = {"plain": "fp32", "modaltune-uncached": precision, "modaltune-cached": precision}
    use = utilisations(rounds, flops, precisions)
    print("\ntraining steps against this machine's ceiling\n" + utilisation_table(use, precisions))
    results = {"training": summary(rounds, "plain"), "eval_rtf": summary(rtf, "plain generate"),
               "cache_fill_seconds_per_clip": fill / need, "utilisation": use}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
