"""The benchmarks (train, sampling, optimizers) and what they share with sd-gpu-check (common, device_check); the
diffusers reference that train.py measures against (reference)."""
