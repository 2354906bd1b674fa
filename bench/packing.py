"""Benchmark: text-sft training throughput with ``data.packing`` against padded batches, on the same examples.

Both variants train the same model (the recipe's LoRA on its LM, precision from the config) over the same first
``--examples`` training examples once per timed pass: ``padded`` in batches of ``--batch-size`` examples padded to
the longest, ``packed`` in rows of up to ``data.max_length`` tokens (``PackedDataset``: whole examples, first-fit
decreasing), ``--rows`` rows per batch. A step is forward, backward and an AdamW update. The table gives seconds per
pass and the ratio to ``padded``; the last lines give real (non-padding) tokens per second, which is what packing
buys: the padded batches spend compute on padding.

    python bench/packing.py                                 # gemma-3-270m from the zoo, 3 rounds x 2 passes
    python bench/packing.py --model PATH --examples 32 --rounds 2 --passes 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--examples", type=int, default=64, help="training examples per pass")
    p.add_argument("--batch-size", type=int, default=8, help="examples per padded batch")
    p.add_argument("--rows", type=int, default=2, help="packed rows per batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--passes", type=int, default=2, help="timed passes per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant per round")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from timing import table

    from modaltune.shared.config import load_config
    from modaltune.shared.lm import build_text_model
    from modaltune.shared.recipe import get_recipe
    from modaltune.shared.skips import Skips
    from modaltune.shared.training import autocast, compute_dtype, resolve_precision
    from modaltune.text.data import (PackedCollator, PackedDataset, PadCollator, PromptFormatter, TokenizedDataset,
                                     load_splits)

    recipe = get_recipe("text-sft")
    cfg = load_config(recipe.config_cls, recipe.default_config_path(), [f"model.name={args.model}"])
    precision = resolve_precision(cfg.train.precision)
    torch.manual_seed(0)
    model, tok, _ = build_text_model(cfg.model, cfg.llm, compute_dtype=compute_dtype(precision),
                                     label_logits_only=cfg.train.label_logits_only, log_fn=lambda *_: None)
    model.train()
    ds = TokenizedDataset(load_splits(cfg.data).examples["train"][: args.examples],
                          PromptFormatter(tok, cfg.model.template), cfg.data.max_length, Skips())
    packed = PackedDataset(ds, cfg.data.max_length)
    pad, pack = PadCollator(tok.pad_token_id), PackedCollator(tok.pad_token_id)
    batches = {
        "padded": [pad([ds[i] for i in range(s, min(s + args.batch_size, len(ds)))])
                   for s in range(0, len(ds), args.batch_size)],
        "packed": [pack([packed[i] for i in range(s, min(s + args.rows, len(packed)))])
                   for s in range(0, len(packed), args.rows)],
    }
    real = sum(len(x["input_ids"]) for x in ds)
    cells = {k: sum(b["input_ids"].numel() for b in v) for k, v in batches.items()}
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.train.lr)

    def step(batch):
        with autocast(precision, "cpu"):
            loss = model(**batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rounds = []
    for r in range(args.rounds):
        times = {}
        for name, bs in batches.items():
            for b in bs[: args.warmup]:
                step(b)
            passes = []
            for _ in range(args.passes):
                t = time.perf_counter()
                for b in bs:
                    step(b)
                passes.append(time.perf_counter() - t)
            times[name] = passes
        rounds.append(times)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {min(v):.2f}s" for k, v in times.items()),
              file=sys.stderr)
    print(table(f"text-sft packing, {args.model}, {len(ds)} examples ({real} real tokens), {precision}", rounds,
                "padded", unit="s/pass", what="timed passes per variant, after warm-up"))
    import statistics

    for name in batches:
        median = statistics.median([t for r in rounds for t in r[name]])
        print(f"{name:8s} {len(batches[name]):3d} batches, {cells[name]:6d} token cells ({100 * real / cells[name]:.0f}% "
              f"real), {real / median:8.1f} real tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "real_tokens": real, "cells": cells,
                                               "fill": packed.fill, "precision": precision}, indent=2))


if __name__ == "__main__":
    main()
