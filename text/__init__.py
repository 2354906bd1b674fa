"""modaltune.text: instruction formatting, SFT data and generation evaluation for causal LMs (loaded by
:mod:`modaltune.shared.lm`, which every composed model shares)."""
