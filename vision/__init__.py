"""modaltune.vision: images for the shared core.

Image encoders that implement the feature cache's protocol (:mod:`~modaltune.vision.encoders`: the packaged
EfficientNet-Lite0, timm CNN/ViT/EVA, CLIP/SigLIP), image I/O (:mod:`~modaltune.vision.images`), VQA and caption
layouts with counted skips and the prompt templates (:mod:`~modaltune.vision.data`), and VQA/caption sets and
evaluation (:mod:`~modaltune.vision.vqa`).
"""
