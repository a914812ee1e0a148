"""Shared fixtures (the tiny model, a tiny SD v1 checkpoint written by the tests) and hooks; the helpers that are not
fixtures are in tests/helpers/."""
import os
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import save_weights
from tests.helpers.models import build_tiny_model

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


@pytest.fixture(scope="session")
def tiny_model():
    return build_tiny_model()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_model) -> Path:
    """A tiny SD v1-layout .ckpt (weights only) with the same weights as `tiny_model`."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd-v1.ckpt"
    save_weights(tiny_model.state_dict(), path)
    return path
