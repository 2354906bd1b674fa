"""Benchmark: med-vqa training step vs a straightforward LLaVA-style step on the same models and batches.

Both use the recipe's composed model (efficientnet-lite0 -> group 4 -> its default projector -> gemma-3-270m + LoRA) and
the same easy-vqa batches. Ratios are against the baseline measured in the same run:

- LLaVA-style: the image encoder runs every step on preprocessed pixels, the loss takes full ``(B, T, V)`` logits,
  fp32 (what a straightforward loop does);
- modaltune: cached frozen-encoder features, output layer only at answer positions, the recipe's precision.

    python bench/med_vqa.py [--batch-size 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import torch

    from modaltune.shared.config import load_config
    from modaltune.shared.recipe import get_recipe
    from modaltune.vision.data import read_easy_vqa
    from modaltune.vision.vqa import FeatureCache, VLCollator, VLDataset, vqa_rows

    recipe = get_recipe("med-vqa")
    cfg = load_config(recipe.config_cls, recipe.default_config_path(), [f"train.batch_size={args.batch_size}"])
    model, tok, _, precision = recipe.build(cfg)
    items, _ = read_easy_vqa("train")
    n = args.batch_size * (args.steps + 1)
    rows = vqa_rows(items[:n])
    plain_ds = VLDataset(rows, tok, None, max_length=128, skipped=Counter())
    t = time.perf_counter()
    cache = FeatureCache(model.encoder, batch_size=64, autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    cache.fill([r["image"] for r in rows])
    fill = (time.perf_counter() - t) / len({r["image"] for r in rows})
    cached_ds = VLDataset(rows, tok, cache, max_length=128, skipped=Counter())

    def batches(ds, collate):
        return [collate([ds[i] for i in range(k * args.batch_size, (k + 1) * args.batch_size)])
                for k in range(args.steps + 1)]

    trainable = [q for q in model.parameters() if q.requires_grad]
    results = {}

    def timed(name, data, *, label_only: bool, bf16: bool):
        model.label_logits_only = label_only
        model.train()
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        times = []
        for batch in data:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        results[name] = {"step_seconds": sum(times[1:]) / len(times[1:])}
        print(f"measured {name}: {results[name]['step_seconds']:.2f} s/step", flush=True)

    timed("llava-style", batches(plain_ds, VLCollator(tok.pad_token_id, model.encoder)), label_only=False, bf16=False)
    timed("modaltune", batches(cached_ds, VLCollator(tok.pad_token_id)), label_only=True, bf16=precision == "bf16")
    base = results["llava-style"]["step_seconds"]
    print(f"\nmed-vqa step benchmark: batch {args.batch_size}, {args.steps} timed steps, precision {precision}")
    print(f"{'step':14s} {'s/step':>8s} {'x llava':>8s}")
    for name, r in results.items():
        print(f"{name:14s} {r['step_seconds']:8.2f} {r['step_seconds'] / base:8.2f}")
    print(f"(feature cache fill: {fill:.3f} s per image, once, reused by every epoch, stage and evaluation)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
