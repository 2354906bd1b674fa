"""modaltune.shared: the core every modality stands on."""
