"""Loading and writing SD v1 weight files: layouts, EMA, safety, clear refusals, atomic writes."""
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FULL_CONFIG, REPO, SPEC, build_tiny_model, read_spec
from ldm.checkpoint import CheckpointError, ema_key, load_model_weights, read_state_dict, save_weights
from ldm.util import count_params, instantiate_from_config

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def as_released(model) -> dict[str, torch.Tensor]:
    """The model's weights as a real *-full-ema file carries them: position_ids and LitEma copies included."""
    state = dict(model.state_dict())
    state[POSITION_IDS] = torch.arange(77).unsqueeze(0)
    for key in [k for k in state if k.startswith("model.diffusion_model.")]:
        state[ema_key(key)] = state[key] + 1.0
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int)
    return state


def assert_same_weights(a, b, prefix=""):
    for key, value in a.state_dict().items():
        if key.startswith(prefix):
            assert torch.equal(value, b.state_dict()[key]), key


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_round_trip_with_position_ids_and_ema(tmp_path, tiny_model, suffix):
    path = tmp_path / f"released{suffix}"
    save_weights(as_released(tiny_model), path)
    plain, ema = build_tiny_model(seed=1), build_tiny_model(seed=2)
    report = load_model_weights(plain, path)
    assert_same_weights(tiny_model, plain)
    n_unet = sum(k.startswith("model.diffusion_model.") for k in tiny_model.state_dict())
    assert report.unexpected["EMA"] == n_unet + 2 and report.loaded["UNet"] == n_unet
    load_model_weights(ema, path, use_ema=True)
    key = "model.diffusion_model.out.2.bias"
    assert torch.equal(ema.state_dict()[key], tiny_model.state_dict()[key] + 1.0)
    assert_same_weights(tiny_model, ema, prefix="first_stage_model.")


def test_lightning_file_with_callback_state_loads(tmp_path, tiny_model):
    from pytorch_lightning.callbacks import ModelCheckpoint
    path = tmp_path / "lightning1.ckpt"
    torch.save({"state_dict": tiny_model.state_dict(), "global_step": 470000, "epoch": 6,
                "callbacks": {ModelCheckpoint: {"best_model_score": None}}}, path)
    load_model_weights(build_tiny_model(seed=3), path)


def test_transformers_layout_text_keys_are_mapped(tmp_path, tiny_model):
    state = {k.replace("transformer.text_model.", "transformer."): v for k, v in tiny_model.state_dict().items()}
    path = tmp_path / "hf-layout.safetensors"
    save_weights(state, path)
    model = build_tiny_model(seed=4)
    load_model_weights(model, path)
    assert_same_weights(tiny_model, model, prefix="cond_stage_model.")


class RunsCode:
    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_runs_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.ckpt"
    content = {"state_dict": {}, "x": payload}
    if writer == "torch.save":
        torch.save(content, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(content, handle)
    with pytest.raises(CheckpointError, match="evil.ckpt.*safetensors") as refused:
        read_state_dict(path)
    assert not marker.exists()
    if writer == "torch.save":
        assert "posix.system" in str(refused.value)


def test_missing_group_is_refused(tmp_path, tiny_model):
    path = tmp_path / "unet-only.safetensors"
    save_weights({k: v for k, v in tiny_model.state_dict().items() if not k.startswith("first_stage")}, path)
    with pytest.raises(CheckpointError, match="has no VAE weights"):
        load_model_weights(build_tiny_model(), path)


def test_partially_missing_group_is_refused(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    del state["model.diffusion_model.out.2.weight"]
    path = tmp_path / "partial.safetensors"
    save_weights(state, path)
    with pytest.raises(CheckpointError, match="lacks 1 of .* UNet"):
        load_model_weights(build_tiny_model(), path)


def test_sd2_context_is_refused(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    key = next(k for k in state if k.endswith("attn2.to_k.weight"))
    state[key] = torch.zeros(state[key].shape[0], 1024)
    path = tmp_path / "sd2.safetensors"
    save_weights(state, path)
    with pytest.raises(CheckpointError, match="Stable Diffusion 2"):
        load_model_weights(build_tiny_model(), path)


def test_missing_and_damaged_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.ckpt")
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="damaged.ckpt"):
        read_state_dict(damaged)


def test_half_safetensors_and_atomic_write(tmp_path, tiny_model):
    path = tmp_path / "out" / "weights.safetensors"
    save_weights(tiny_model.state_dict(), path, half=True)
    state = read_state_dict(path)
    assert state["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert state["alphas_cumprod"].dtype == torch.float32
    assert [p.name for p in path.parent.iterdir()] == ["weights.safetensors"]


def test_failed_write_keeps_previous_file(tmp_path, tiny_model):
    path = tmp_path / "last.ckpt"
    save_weights(tiny_model.state_dict(), path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_weights({"bad": object()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_full_size_model_has_exactly_the_spec_keys():
    config = OmegaConf.load(FULL_CONFIG)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = read_spec()
    assert len(spec) == 1142
    assert sorted(set(spec) - set(ours)) == [] and sorted(set(ours) - set(spec)) == []
    assert {k: s for k, s in ours.items() if spec[k] != s} == {}
    unet = count_params(model.model.diffusion_model)
    print(f"UNet {unet / 1e6:.2f} M, VAE {count_params(model.first_stage_model) / 1e6:.2f} M, "
          f"text encoder {count_params(model.cond_stage_model) / 1e6:.2f} M parameters")
    assert round(unet / 1e6, 2) == 859.52


def test_a_clone_stands_alone():
    """The spec lives in tests/data; no test reads beside the repository; what the README makes is git-ignored."""
    assert SPEC.is_file() and SPEC.resolve().is_relative_to(REPO)
    outside = ("REPO.parent", "parents[2]", "/".join(("..", "shared")))
    for source in (REPO / "tests").glob("*.py"):
        if source.name != Path(__file__).name:
            assert not [s for s in outside if s in source.read_text()], source.name
    ignored = set((REPO / ".gitignore").read_text().split())
    assert {"/class_images/", "/outputs/", "/logs/", "/models/", ".venv/"} <= ignored
    if shutil.which("git") and (REPO / ".git").exists():
        check = subprocess.run(["git", "check-ignore", "ldm/models/diffusion/ddpm.py", "tests/data/sd-v1-state-dict.tsv"],
                               cwd=REPO, capture_output=True, text=True)
        assert check.stdout == ""  # anchored patterns: ldm/models/ and the spec stay tracked
