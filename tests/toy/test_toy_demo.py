"""The committed toy base model: it loads with the toy configs, stays small, and its configs hold the measured scale
factor (the demo end to end: tests/e2e/test_toy_demo_e2e.py)."""
import pytest
from omegaconf import OmegaConf

from ldm.checkpoint import load_model_weights
from ldm.util import instantiate_from_config
from tests.helpers.repo import REPO

TOY = REPO / "configs" / "toy"
BASE = REPO / "data" / "toy" / "toy-v1.safetensors"


@pytest.mark.parametrize("config", ["v1-inference.yaml", "v1-finetune_unfrozen.yaml"])
def test_committed_base_model_loads_with_the_toy_configs(config):
    model = instantiate_from_config(OmegaConf.load(TOY / config).model)
    report = load_model_weights(model, BASE)
    assert report.loaded["UNet"] and report.loaded["VAE"] and report.loaded["text encoder"]
    assert BASE.stat().st_size < 20 * 2 ** 20
    assert 0.2 < OmegaConf.load(TOY / config).model.params.scale_factor < 5  # measured, not the placeholder 1.0
