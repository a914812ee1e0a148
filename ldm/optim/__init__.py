"""Optimizers and schedules: the optimizer a config names (factory.py), per-parameter steps fused into the backward
pass with stochastic rounding (per_parameter.py), the 8-bit AdamW (adamw8bit.py), and the learning-rate schedules
(schedules.py; ldm/lr_scheduler.py keeps the CompVis path)."""
