"""Shared fixtures: the tiny config, a seeded tiny model, and a tiny SD v1 checkpoint written by the tests."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import save_weights
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """scripts/<name>.py as a module, for testing its functions."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
TINY_CONFIG = REPO / "configs" / "tiny" / "v1-inference.yaml"
FULL_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
SPEC = REPO / "tests" / "data" / "sd-v1-state-dict.tsv"  # a copy of the project's shared spec

# The files that take longest (half a minute to two minutes each on 2 cores, 2026-12-07), longest first: `make test`
# gives each file to one of two workers in collection order, and a long file started last would leave the other worker
# idle at the end.
LONGEST_FIRST = ("test_savers_e2e.py", "test_distributed.py", "test_packaging.py", "test_train_e2e.py",
                 "test_lora_train.py", "test_toy_demo.py", "test_toy_model.py", "test_recipe_e2e.py",
                 "test_gpu_check.py", "test_benchmark_train.py", "test_txt2img_cli.py", "test_ema.py")


def pytest_collection_modifyitems(items: list) -> None:
    """Order the collected tests with LONGEST_FIRST's files first, the rest as collected."""
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny models are far faster on one thread than on two cores that pytest and PyTorch compete for.
torch.set_num_threads(1)


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

    from ldm.modules.encoders.modules import TOKENIZER_DIR, load_tokenizer
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


def read_spec() -> dict[str, tuple[int, ...]]:
    """Key -> shape of a Stable Diffusion v1 checkpoint, from the spec kept in tests/data."""
    spec = {}
    for line in SPEC.read_text().splitlines():
        key, shape = line.split("\t")
        spec[key] = tuple(int(n) for n in shape.split("x"))
    return spec


@pytest.fixture(scope="session")
def tiny_model():
    return build_tiny_model()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_model) -> Path:
    """A tiny SD v1-layout .ckpt (weights only) with the same weights as `tiny_model`."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd-v1.ckpt"
    save_weights(tiny_model.state_dict(), path)
    return path
