"""Shared fixtures (the tiny model, a tiny SD v1 checkpoint written by the tests) and hooks; the helpers that are not
fixtures are in tests/helpers/."""
import os
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import save_weights
from tests.helpers.models import build_tiny_model

# The files that take longest, longest first (2 cores, 2026-12-07): `make test` gives each file to one of two workers in
# this order (pytest_configure keeps pytest-xdist from sorting the files by their number of tests), and a long file
# started last would leave the other worker idle at the end. The end-to-end files (tests/e2e/, 5 s to 5 min each) come
# first, then the longest of the rest (5 to 30 s each), which `pytest -m "not e2e"` runs alone.
LONGEST_FIRST = ("test_toy_methods_e2e.py", "test_savers_e2e.py", "test_train_e2e.py", "test_packaging.py",
                 "test_distributed.py", "test_txt2img_cli.py", "test_lora_train.py", "test_toy_demo_e2e.py",
                 "test_recipe_e2e.py", "test_gpu_check_e2e.py", "test_best_step_e2e.py", "test_network_kinds_e2e.py",
                 "test_frozen_prior_e2e.py", "test_benchmark_train_e2e.py", "test_toy_model_e2e.py", "test_ema_e2e.py",
                 "test_embedding_train_e2e.py",
                 "test_runs_e2e.py", "test_readme_workflow.py", "test_latent_cache_e2e.py", "test_export_e2e.py",
                 "test_diffusers_folders_e2e.py", "test_concepts_e2e.py", "test_buckets_e2e.py",
                 "test_monitors_e2e.py", "test_masks_e2e.py", "test_toy_world_e2e.py", "test_clip_skip_e2e.py",
                 "test_offline_e2e.py", "test_evaluate_e2e.py",
                 "test_controlnet_sampling.py", "test_lora.py", "test_memory_savers.py", "test_samplers.py",
                 "test_checkpoint.py", "test_lora_sampling.py", "test_export.py", "test_precision.py",
                 "test_diffusers_folders.py", "test_adamw8bit.py", "test_toy_model.py")


E2E = Path(__file__).parent / "e2e"
SLOW_REASON = "slow: `make test-all` (pytest --slow) runs it; `make test` leaves it out to stay within 10 minutes"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (make test-all)")


def pytest_configure(config: pytest.Config) -> None:
    """Under `-n 2 --dist loadfile`, hand out the files in collection order (LONGEST_FIRST's), as pytest-xdist 3.8's
    --no-loadscope-reorder does; by default (and always in 3.5 to 3.7) it sends the files with the most tests first."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Order the collected tests with LONGEST_FIRST's files first, the rest as collected; refuse a test in tests/e2e/
    without the e2e marker, which `pytest -m "not e2e"` would run; skip, with its reason, a test marked slow unless
    --slow is given."""
    unmarked = sorted({item.path.name for item in items
                       if item.path.parent == E2E and not item.get_closest_marker("e2e")})
    if unmarked:
        raise pytest.UsageError(f"tests/e2e/ files without `pytestmark = pytest.mark.e2e`: {', '.join(unmarked)}")
    if not config.getoption("--slow"):
        for item in items:
            if item.get_closest_marker("slow"):
                item.add_marker(pytest.mark.skip(reason=SLOW_REASON))
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
