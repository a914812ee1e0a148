"""What main.py's training run adds around the model: run folders, step files and what -r resumes (runs.py), main.py's
flags written into the run's config (flags.py), class images drawn before training (class_images.py), and the latent
cache (latent_cache.py)."""
