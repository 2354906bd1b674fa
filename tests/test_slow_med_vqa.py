"""The packaged EfficientNet-Lite0 + gemma-3-270m learn a handful of easy-vqa questions (`pytest -m slow`)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

pytestmark = pytest.mark.slow


def test_packaged_encoder_and_gemma_fit_a_few_questions():
    from modaltune.shared.config import load_config
    from modaltune.shared.recipe import get_recipe
    from modaltune.vision.data import read_easy_vqa
    from modaltune.vision.vqa import FeatureCache, VLCollator, VLDataset, vqa_rows

    torch.manual_seed(0)
    recipe = get_recipe("med-vqa")
    cfg = load_config(recipe.config_cls, recipe.default_config_path(), ["train.precision=fp32"])
    model, tok, _, _ = recipe.build(cfg)
    items, _ = read_easy_vqa("train")
    rows = vqa_rows(items[:8])
    cache = FeatureCache(model.encoder)
    cache.fill([r["image"] for r in rows])
    ds = VLDataset(rows, tok, cache, max_length=128, skipped=Counter())
    batch = VLCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
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
