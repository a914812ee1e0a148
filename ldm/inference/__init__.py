"""Sampling, as a journey: flags checked with no model loaded (flags.py), the model loaded on its device at its
precision (loading.py, precision.py), the one sampler path (sampling.py), and the runs of the sampling scripts
(txt2img.py). This face keeps the names the scripts and the rest of the library import."""
from ldm.inference.flags import (SAMPLER_NAMES, add_precision_argument, add_sampling_arguments, read_prompts,
                                 resolve_sampler)
from ldm.inference.loading import check_checkpoint, choose_device, load_model, precision_scope, weights_dtype
from ldm.inference.sampling import make_generators, sample_images, sample_latents, sampling_mode
from ldm.inference.txt2img import generate, init_size, load_init_image, next_index

__all__ = ["SAMPLER_NAMES", "add_precision_argument", "add_sampling_arguments", "check_checkpoint", "choose_device",
           "generate", "init_size", "load_init_image", "load_model", "make_generators", "next_index", "precision_scope",
           "read_prompts", "resolve_sampler", "sample_images", "sample_latents", "sampling_mode",
           "weights_dtype"]
