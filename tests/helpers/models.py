"""Tiny models for the tests: the tiny LatentDiffusion with seeded weights, and tiny CLIP and DINO scorers."""
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.modules.encoders.modules import TOKENIZER_DIR, load_tokenizer
from ldm.util import instantiate_from_config
from tests.helpers.repo import TINY_CONFIG


def build_tiny_model(seed: int = 0, **overrides):
    """LatentDiffusion from the tiny config with seeded random weights; `overrides` replace model params."""
    config = OmegaConf.load(TINY_CONFIG)
    for key, value in overrides.items():
        config.model.params[key] = value
    torch.manual_seed(seed)
    return instantiate_from_config(config.model)


def randomise_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the UNet's zero-initialised layers random values, so that eps (and guidance, and the image) depend on
    x, t and the conditioning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.model.parameters():
            if not param.any():
                param.normal_(0.0, 0.05, generator=g)
    return model


def save_tiny_scorers(root: Path) -> tuple[Path, Path]:
    """A tiny random CLIP ViT and a tiny random DINO-like ViT, saved as transformers folders with processors."""
    import transformers

    torch.manual_seed(0)
    clip_config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8}, projection_dim=16)
    transformers.CLIPModel(clip_config).save_pretrained(root / "clip")
    load_tokenizer(TOKENIZER_DIR).save_pretrained(root / "clip")
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                       crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    vit_config = transformers.ViTConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8)
    transformers.ViTModel(vit_config, add_pooling_layer=False).save_pretrained(root / "dino")
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                                      image_std=[0.229, 0.224, 0.225]).save_pretrained(root / "dino")
    return root / "clip", root / "dino"
