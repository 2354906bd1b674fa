"""modaltune.audio: see the project README for what is planned here."""
