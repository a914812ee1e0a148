"""Textual-inversion embeddings: training new token vectors (training.py, the LatentDiffusion mixin) and binding
embedding files to words at sampling time (files.py, `--embedding`)."""
