"""Benchmark: med-vqa training step vs a straightforward LLaVA-style step on the same models and batches.

Both use the recipe's composed model (efficientnet-lite0 -> group 4 -> its default projector -> gemma-3-270m + LoRA) and
the same easy-vqa batches. Ratios are against the baseline measured in the same run:

- LLaVA-style: the image encoder runs every step on preprocessed pixels, the loss takes full ``(B, T, V)`` logits,
  fp32 (what a straightforward loop does);
- modaltune: cached frozen-encoder features, output layer only at answer positions, the recipe's precision.

    python bench/med_vqa.py [--batch-size 8] [--rounds 3] [--steps 6] [--warmup 2]

Each round runs both steps, interleaved, on the same batches: ``--warmup`` untimed steps, then ``--steps`` timed
ones. The table gives median step times and the median and range over rounds of the ratio (``bench/timing.py``),
then each variant's FLOPs a step (counted by torch's FlopCounterMode), the FLOP/s at its median step time and this
machine's matmul peak for its precision, measured in the same run.
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
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs both variants, interleaved")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1, --warmup at least 0")

    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from timing import count_flops, summary, table, timed_steps, utilisation_table, utilisations

    from modaltune.shared.compose_data import ComposedDataset
    from modaltune.shared.config import load_config
    from modaltune.shared.recipe import get_recipe
    from modaltune.shared.skips import Skips
    from modaltune.shared.training import resolve_precision
    from modaltune.vision.data import PLACEHOLDER, read_easy_vqa
    from modaltune.vision.vqa import image_cache, image_collator, vqa_rows

    recipe = get_recipe("med-vqa")
    cfg = load_config(recipe.config_cls, recipe.default_config_path(), [f"train.batch_size={args.batch_size}",
                                                                           f"model.name={args.model}"])
    model, tok, _ = recipe.build_model(cfg)
    precision = resolve_precision(cfg.train.precision)
    items, _ = read_easy_vqa("train")
    n = args.batch_size * (args.warmup + args.steps)
    rows = vqa_rows(items[:n])
    plain_ds = ComposedDataset(rows, tok, None, placeholder=PLACEHOLDER, max_length=128, skipped=Skips())
    t = time.perf_counter()
    cache = image_cache(model.encoder, depth=None, precision=precision)
    cache.fill(sorted({r["image"] for r in rows}))
    fill = (time.perf_counter() - t) / len({r["image"] for r in rows})
    cached_ds = ComposedDataset(rows, tok, cache, placeholder=PLACEHOLDER, max_length=128, skipped=Skips())

    def batches(ds, collate):
        return [collate([ds[i] for i in range(k * args.batch_size, (k + 1) * args.batch_size)])
                for k in range(args.warmup + args.steps)]

    trainable = [q for q in model.parameters() if q.requires_grad]
    plain_batches = batches(plain_ds, image_collator(tok, model.encoder))
    cached_batches = batches(cached_ds, image_collator(tok))

    flops: dict[str, int] = {}

    def timed(data, name: str, *, label_only: bool, bf16: bool) -> list[float]:
        model.label_logits_only = label_only
        model.train()
        opt = torch.optim.AdamW(trainable, lr=1e-4)

        def forward_backward(batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch)["loss"]
            loss.backward()

        def step(batch):
            forward_backward(batch)
            opt.step()
            opt.zero_grad()

        if name not in flops:  # once: what one step computes (encoder included where it runs)
            flops[name] = count_flops(lambda: forward_backward(data[args.warmup]))
            opt.zero_grad()
        return timed_steps(step, data, args.warmup)

    rounds = []
    for k in range(args.rounds):
        rounds.append({"llava-style": timed(plain_batches, "llava-style", label_only=False, bf16=False),
                       "modaltune": timed(cached_batches, "modaltune", label_only=True, bf16=precision == "bf16")})
        print(f"round {k + 1}/{args.rounds}: " + ", ".join(f"{n} {sorted(t)[len(t) // 2]:.2f} s/step"
                                                          for n, t in rounds[-1].items()), flush=True)
    print(table(f"\nmed-vqa step benchmark: batch {args.batch_size}, precision {precision}", rounds, "llava-style",
                label="x llava"))
    print(f"(feature cache fill: {fill:.3f} s per image, once, reused by every epoch, stage and evaluation)")
    precisions = {"llava-style": "fp32", "modaltune": precision}
    use = utilisations(rounds, flops, precisions)
    print("\n" + utilisation_table(use, precisions))
    results = summary(rounds, "llava-style")
    for name in use:
        results[name]["utilisation"] = use[name]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
