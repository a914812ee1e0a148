"""LoRA in one place: the one map between our parameter names and kohya's (names.py), the layers injected into and
merged with the model (layers.py), LoRA files at sampling time (files.py), the LightningModule mixin that trains and
saves a LoRA (training.py), and LoRA extraction from a fine-tune and resizing by truncated SVD (extraction.py)."""
