"""What a training batch holds, defined once. An example has the instance photo's `image` [H, W, C] in [-1, 1] (or,
with the latent cache, `moments`: its VAE posterior's mean and logvar), its `caption`, and a loss `mask` [H, W] when
its folder has masks; with prior preservation the class example that goes with it sits in the same dict under the
same keys with the `class_` prefix; with several subjects, `concept` names the subject. With prior preservation by
the frozen model (no class images), `prior_caption` holds the class prompt of the example's subject instead."""
from typing import Any, Mapping

MOMENTS_KEY = "moments"  # cached VAE posterior parameters (mean and logvar), yielded instead of `image`
MASK_KEY = "mask"  # a photo's loss mask [H, W], when its folder has masks
CONCEPT_KEY = "concept"
PRIOR_CAPTION_KEY = "prior_caption"  # the class prompt under which the frozen model's prediction is the class target
CLASS_PREFIX = "class_"


def class_key(key: str) -> str:
    """The key under which a batch holds the class examples' `key`."""
    return CLASS_PREFIX + key


def prefixes(batch: Mapping[str, Any], caption_key: str) -> list[str]:
    """The key prefixes of the batch's parts: the instance examples' "", then "class_" when it has class examples."""
    return [""] + ([CLASS_PREFIX] if class_key(caption_key) in batch else [])


def with_class_example(example: Mapping[str, Any], prior: Mapping[str, Any]) -> dict[str, Any]:
    """An instance example with its class example under the `class_` keys."""
    return {**example, **{class_key(key): value for key, value in prior.items()}}


def split_batch(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The batch's instance part and its class part (the class keys without their prefix)."""
    instance = {k: v for k, v in batch.items() if not k.startswith(CLASS_PREFIX)}
    prior = {k[len(CLASS_PREFIX):]: v for k, v in batch.items() if k.startswith(CLASS_PREFIX)}
    return instance, prior
