"""modaltune.text: causal LMs, instruction formatting, SFT data and evaluation."""
