"""Benchmark: audio-llm training step through the feature cache vs a loop that runs the speech encoder every step.

Both use the recipe's composed model (whisper-tiny.en encoder -> 8 frames stacked -> its default projector ->
gemma-3-270m + LoRA, stage 2: projector and LoRA train) and the same batches of built-in dictation clips (task rows:
transcription and medication orders). Ratios are against the encoder-every-step loop measured in the same run:

- encoder every step: log-mel features of each clip's 30 s window go through Whisper's encoder on every step, as a
  loop without a cache does (frames then trimmed to the clip, as the recipe does);
- modaltune: the encoder's states cached once per clip (trimmed), output layer only at answer positions.

With ``--med-vqa`` the med-vqa recipe's cached step on easy-vqa batches of the same size runs in the same rounds, so
the table shows what a speech step costs next to an image step.

    python bench/audio_llm.py [--batch-size 8] [--rounds 3] [--steps 6] [--warmup 2] [--med-vqa]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="the LLM: zoo name, local folder or hub id")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every variant, interleaved")
    p.add_argument("--med-vqa", action="store_true", help="also time med-vqa's cached step in the same rounds")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1, --warmup at least 0")

    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from timing import count_flops, summary, table, timed_steps, utilisation_table, utilisations

    from modaltune.audio.asr import ASRDataConfig, load_asr_sets
    from modaltune.audio.tasks import AUDIO_PLACEHOLDER, AudioTasksConfig, task_rows
    from modaltune.shared.compose import anchor_on_text
    from modaltune.shared.compose_data import ComposedCollator, ComposedDataset
    from modaltune.shared.config import load_config
    from modaltune.shared.features import FeatureCache
    from modaltune.shared.recipe import get_recipe
    from modaltune.shared.skips import Skips
    from modaltune.shared.training import autocast_dtype, resolve_precision

    n = args.batch_size * (args.warmup + args.steps)
    recipe = get_recipe("audio-llm")
    cfg = load_config(recipe.config_cls, recipe.default_config_path(), [f"train.batch_size={args.batch_size}",
                                                                           f"model.name={args.model}"])
    model, tok, _ = recipe.build_model(cfg)
    precision = resolve_precision(cfg.train.precision)
    sets, _ = load_asr_sets(ASRDataConfig(general=None, validation_fraction=0.0), log=lambda _: None)
    all_rows = task_rows(sets["train"], AudioTasksConfig(), train=True)
    if cfg.projector.uses_words:  # word tokens anchored on the training text, as the recipe does
        anchor_on_text(model, tok, [r["target"] for r in all_rows], cfg.projector.anchor_words, log=lambda _: None)
    rows = all_rows[:n]
    waves = {c.id: c.wave for c in sets["train"]}
    plain_ds = ComposedDataset(rows, tok, None, placeholder=AUDIO_PLACEHOLDER, max_length=192, skipped=Skips())
    t = time.perf_counter()
    cache = FeatureCache(model.encoder, batch_size=16, autocast_dtype=autocast_dtype(precision), load=waves.get)
    cache.fill(sorted({r["input"] for r in rows}))
    fill = (time.perf_counter() - t) / len({r["input"] for r in rows})
    cached_ds = ComposedDataset(rows, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=192, skipped=Skips())
    frames = sum(f.size(0) for f in cache.states.values()) / len(cache.states)

    def batches(ds, collate):
        return [collate([ds[i] for i in range(k * args.batch_size, (k + 1) * args.batch_size)])
                for k in range(args.warmup + args.steps)]

    plain_batches = batches(plain_ds, ComposedCollator(tok.pad_token_id, model.encoder, load=waves.get))
    cached_batches = batches(cached_ds, ComposedCollator(tok.pad_token_id))
    bf16 = precision == "bf16"

    flops: dict[str, int] = {}

    def timed(m, data, name) -> list[float]:
        m.train()
        opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)

        def forward_backward(batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = m(**batch)["loss"]
            loss.backward()

        def step(batch):
            forward_backward(batch)
            opt.step()
            opt.zero_grad()

        if name not in flops:  # once: what one step computes (the encoder included where it runs)
            flops[name] = count_flops(lambda: forward_backward(data[args.warmup]))
            opt.zero_grad()
        return timed_steps(step, data, args.warmup)

    vqa = None
    if args.med_vqa:
        from modaltune.vision.data import PLACEHOLDER, read_easy_vqa
        from modaltune.vision.vqa import image_cache, image_collator, vqa_rows

        vr = get_recipe("med-vqa")
        vcfg = load_config(vr.config_cls, vr.default_config_path(), [f"train.batch_size={args.batch_size}",
                                                                      f"model.name={args.model}"])
        vmodel, vtok, _ = vr.build_model(vcfg)
        items, _ = read_easy_vqa("train")
        vrows = vqa_rows(items[:n])
        vcache = image_cache(vmodel.encoder, depth=None, precision=precision)
        vcache.fill(sorted({r["image"] for r in vrows}))
        vds = ComposedDataset(vrows, vtok, vcache, placeholder=PLACEHOLDER, max_length=128, skipped=Skips())
        vqa = (vmodel, batches(vds, image_collator(vtok)))

    rounds = []
    for k in range(args.rounds):
        got = {"encoder every step": timed(model, plain_batches, "encoder every step"),
               "modaltune": timed(model, cached_batches, "modaltune")}
        if vqa is not None:
            got["med-vqa (cached)"] = timed(*vqa, "med-vqa (cached)")
        rounds.append(got)
        print(f"round {k + 1}/{args.rounds}: " + ", ".join(f"{name} {sorted(t)[len(t) // 2]:.2f} s/step"
                                                          for name, t in got.items()), flush=True)
    print(table(f"\naudio-llm step benchmark: batch {args.batch_size}, precision {precision}", rounds,
                "encoder every step", label="x encoder every step"))
    print(f"(feature cache fill: {fill:.3f} s per clip, once; {frames:.0f} frames kept per clip on average, "
          "of Whisper's 1500)")
    precisions = {name: precision for name in rounds[0]}
    use = utilisations(rounds, flops, precisions)
    print("\n" + utilisation_table(use, precisions))
    results = summary(rounds, "encoder every step")
    for name in use:
        results[name]["utilisation"] = use[name]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
