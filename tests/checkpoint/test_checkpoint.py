"""Loading and writing SD v1 weight files: layouts, EMA, safety, clear refusals, atomic writes."""
import errno
import logging
import os
import pickle
import re
import shutil
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import (CheckpointError, check_checkpoint_file, ema_key, group_of, load_model_weights,
                            read_state_dict, remove_stale_temp_files, save_checkpoint, save_weights)
from ldm.checkpoint.files import is_finite
from ldm.util import DiskFullError, atomic_write, count_params, instantiate_from_config
from tests.helpers.models import build_tiny_model
from tests.helpers.other_tools import check_a1111_ckpt
from tests.helpers.repo import FULL_CONFIG, REPO
from tests.helpers.specs import SPEC, read_spec

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
    ema_report = load_model_weights(ema, path, use_ema=True)
    assert not ema_report.unexpected and "ignored" not in ema_report.summary()  # the EMA copies were used
    assert ema_report.summary().endswith("(the UNet from the file's EMA weights)")
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
    save_weights(tiny_model.state_dict(), path, dtype=torch.float16)
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
    """The spec lives in tests/fixtures; no test reads beside the repository; what the README's and docs' commands make
    is git-ignored."""
    assert SPEC.is_file() and SPEC.resolve().is_relative_to(REPO)
    for source in (REPO / "tests").rglob("*.py"):
        if source.name != Path(__file__).name:
            depth = len(source.relative_to(REPO).parts)  # tests/a/b.py: parents[2] is the repository, [3] beside it
            outside = ("REPO.parent", f"parents[{depth}]", "/".join(("..", "shared")))
            assert not [s for s in outside if s in source.read_text()], source.relative_to(REPO)
    ignored = set((REPO / ".gitignore").read_text().split())
    assert {"/class_images/", "/outputs/", "/logs/", "/models/", ".venv/"} <= ignored
    if shutil.which("git") and (REPO / ".git").exists():
        tracked = ["ldm/models/diffusion/ddpm.py", "tests/fixtures/sd-v1-state-dict.tsv"]
        check = subprocess.run(["git", "check-ignore", *tracked], cwd=REPO, capture_output=True, text=True)
        assert check.stdout == ""  # anchored patterns: ldm/models/ and the spec stay tracked


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_every_ckpt_we_write_passes_a1111_and_loads_with_mmap(tmp_path, tiny_model):
    weights, full = tmp_path / "step_2.ckpt", tmp_path / "last.ckpt"
    save_weights(tiny_model.state_dict(), weights)
    optimizer = torch.optim.AdamW(tiny_model.parameters())
    save_checkpoint({"state_dict": tiny_model.state_dict(), "optimizer_states": [optimizer.state_dict()],
                     "global_step": 2}, full)
    for path in (weights, full):
        names = check_a1111_ckpt(path)
        assert {n.split("/", 1)[1] for n in names} >= {"data.pkl", "version", "data/0"}
        reader = torch._C.PyTorchFileReader(str(path))
        assert all(reader.get_record_offset(n) % 64 == 0 for n in reader.get_all_records() if n.startswith("data/"))
        for mmap in (False, True):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)["state_dict"]
            assert all(torch.equal(state[k], v) for k, v in tiny_model.state_dict().items())
    plain = tmp_path / "torch-default.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(AssertionError, match=r"refuses the zip entries .*\.format_version"):  # the helper can fail
        check_a1111_ckpt(plain)


@pytest.mark.parametrize("name", ["w.safetensors", "w.ckpt"])
def test_files_for_sharing_get_ordinary_permissions(tmp_path, tiny_model, name):
    save_weights(tiny_model.state_dict(), tmp_path / name, dtype=torch.float16)
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask()


def test_load_report_names_extra_tensors(tmp_path, tiny_model, caplog):
    state = as_released(tiny_model)
    state["lora_unet_down.alpha"] = torch.tensor(1.0)
    path = tmp_path / "extra.safetensors"
    save_weights(state, path)
    with caplog.at_level(logging.INFO):
        report = load_model_weights(build_tiny_model(seed=1), path)
    assert report.unexpected["other"] == 1 and report.loaded["noise schedule"] == 12
    assert "1 other tensors (e.g. lora_unet_down.alpha)" in report.ignored() and "EMA tensors" in report.ignored()
    assert "schedule tensors" not in caplog.text and "noise schedule 12" in caplog.text
    assert [group_of(k) for k in ("betas", "alphas_cumprod", "model_ema.decay", "x.y")] == [
        "noise schedule", "noise schedule", "EMA", "other"]


NOT_CHECKPOINTS = {
    "a text file": (b"just some notes\n", "is not a checkpoint but a text file (it begins 'just some notes')"),
    "an HTML page": (b"<!DOCTYPE html><html><head><title>Sign in</title>", "a web page"),
    "a Git LFS pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 4265380512\n",
                          "git lfs pull"),
    "an empty file": (b"", "is empty (0 bytes)"),
}


@pytest.mark.parametrize("case", list(NOT_CHECKPOINTS))
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_a_file_that_is_not_a_checkpoint_is_named_so(tmp_path, case, suffix):
    content, message = NOT_CHECKPOINTS[case]
    path = tmp_path / f"model{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        read_state_dict(path)


def test_a_folder_is_not_a_checkpoint(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file$"):
        check_checkpoint_file(tmp_path)
    save_weights(tiny_model.state_dict(), tmp_path / "inside.safetensors")
    with pytest.raises(CheckpointError, match="it holds inside.safetensors: pass one of them"):
        check_checkpoint_file(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is a diffusers folder without unet/config.json: not a Stable"):
        read_state_dict(tmp_path)


def test_weights_with_nan_are_refused_naming_the_tensor(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    key = "model.diffusion_model.out.2.bias"
    state[key] = state[key].clone()
    state[key][1] = float("inf")
    path = tmp_path / "diverged.ckpt"
    save_weights(state, path)
    with pytest.raises(CheckpointError, match=f"tensor {re.escape(key)} holds 1 NaN or inf values"):
        load_model_weights(build_tiny_model(), path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_is_finite_finds_one_bad_value_in_any_float_type(dtype, bad):
    value = torch.linspace(-3, 3, 1000).to(dtype)
    assert is_finite(value) and is_finite(value[:0]) and is_finite(value[7])
    value[611] = bad
    assert not is_finite(value) and not is_finite(value[611])


def test_full_disk_stops_before_writing_and_keeps_the_previous_file(tmp_path, tiny_model, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_weights(tiny_model.state_dict(), path)
    before = path.read_bytes()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    with pytest.raises(DiskFullError, match=r"last.ckpt: it needs about \d+\.\d MB, 1.0 kB free") as full:
        save_weights(tiny_model.state_dict(), path)
    assert full.value.needed > sum(v.numel() * v.element_size() for v in tiny_model.state_dict().values())
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_enospc_during_a_write_leaves_no_partial_file(tmp_path, tiny_model, monkeypatch):
    def fill_the_disk(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="not enough disk space for .*step_9.ckpt"):
        atomic_write(tmp_path / "step_9.ckpt", fill_the_disk, 10)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_files_are_removed(tmp_path, caplog):
    for name in (".step_4.ckpt.tmp-4242", ".last.ckpt.tmp-17", "step_2.ckpt", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level(logging.INFO):
        removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == [".last.ckpt.tmp-17", ".step_4.ckpt.tmp-4242"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "step_2.ckpt"]
    assert "removed 2 temporary files of interrupted writes" in caplog.text
