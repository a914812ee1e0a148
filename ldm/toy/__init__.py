"""The toy world: the renderer of its scenes (world.py), the pretraining of its small model (pretraining.py), the
scorer that reads a sample's subject and context (scorer.py), its metrics (metrics.py) and the demo's report
(demo.py)."""
