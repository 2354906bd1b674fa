"""The packaged EfficientNet-Lite0 + gemma-3-270m learn a handful of easy-vqa questions (`pytest -m slow`)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

pytestmark = pytest.mark.slow


def test_packaged_encoder_and_gemma_fit_a_few_questions():
    from modaltune.shared.config import load_config
    from modaltune.shared.recipe import get_recipe
    from modaltune.shared.compose_data import ComposedDataset
    from modaltune.vision.data import PLACEHOLDER, read_easy_vqa
    from modaltune.vision.vqa import image_cache, image_collator, vqa_rows

    torch.manual_seed(0)
    recipe = get_recipe("med-vqa")
    cfg = load_config(recipe.config_cls, recipe.default_config_path(), ["train.precision=fp32"])
    model, tok, _ = recipe.build_model(cfg)
    items, _ = read_easy_vqa("train")
    rows = vqa_rows(items[:8])
    cache = image_cache(model.encoder, depth=None, precision="fp32")
    cache.fill([r["image"] for r in rows])
    ds = ComposedDataset(rows, tok, cache, placeholder=PLACEHOLDER, max_length=128, skipped=Counter())
    batch = image_collator(tok)([ds[i] for i in range(len(ds))])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(**batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
