"""modaltune.recipes: one module per recipe, configs in ``configs/*.yaml``."""
