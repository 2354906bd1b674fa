"""modaltune.audio: speech for the shared core.

Whisper loading with per-component PEFT (:mod:`~modaltune.audio.whisper`), its encoder as a token encoder for
composed models (:mod:`~modaltune.audio.encoders`, ``encoder.kind: whisper``), audio I/O and augmentation, ASR
manifests with counted skips (:mod:`~modaltune.audio.data`), the built-in synthetic dictation set
(:mod:`~modaltune.audio.synth`), ASR sets, evaluation passes and charts (:mod:`~modaltune.audio.asr`), WER/CER/term
recall (:mod:`~modaltune.audio.eval`) and the CT2-to-transformers conversion of packaged weights.
"""
