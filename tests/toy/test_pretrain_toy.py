"""Toy pretraining as docs/toy-world.md gives it: results go to the work folder (never the committed files unless
`--data_dir data/toy`), the scale factor goes into every toy config or none, and `--init` never silently loses to a
resumable state."""
import hashlib
import json
import logging
import shutil

import pytest
from omegaconf import OmegaConf

from tests.helpers.repo import REPO, load_script

TINY_VAE = ["--vae_steps", "1", "--vae_pool", "12", "--threads", "1"]


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def pretrain(monkeypatch, tmp_path):
    """scripts/pretrain_toy_model.py with its committed data and toy configs replaced by copies under tmp_path."""
    script = load_script("pretrain_toy_model")
    data, configs = tmp_path / "committed" / "data_toy", tmp_path / "committed" / "configs_toy"
    shutil.copytree(REPO / "data/toy", data, ignore=shutil.ignore_patterns("subject*"))
    shutil.copytree(REPO / "configs/toy", configs)
    monkeypatch.setattr(script, "DATA", data)
    monkeypatch.setattr(script, "TOY_CONFIGS", configs)
    monkeypatch.setattr(script, "MODEL_CONFIG", configs / "v1-inference.yaml")
    monkeypatch.chdir(tmp_path)
    return script, data, configs


def scale_factors(configs) -> dict[str, float]:
    return {p.name: OmegaConf.load(p).model.params.scale_factor for p in sorted(configs.glob("*.yaml"))}


def test_by_default_the_results_go_to_the_work_folder_and_no_config_changes(pretrain, caplog):
    script, data, configs = pretrain
    before, factors = digest(data), scale_factors(configs)
    with caplog.at_level(logging.INFO):
        assert script.main(["--stage", "vae", *TINY_VAE]) == 0
    work = script.Path("outputs/toy-pretrain")
    record = json.loads((work / "pretraining.json").read_text())
    assert (work / "vae.safetensors").is_file() and digest(data) == before and scale_factors(configs) == factors
    measured = record["vae"]["scale_factor"]
    assert any(f"need model.params.scale_factor: {measured:.5f}" in r.message for r in caplog.records)


def test_data_dir_data_toy_replaces_the_committed_files_and_updates_every_toy_config(pretrain):
    script, data, configs = pretrain
    assert script.main(["--stage", "vae", *TINY_VAE, "--data_dir", str(data)]) == 0
    measured = json.loads((data / "pretraining.json").read_text())["vae"]["scale_factor"]
    assert len(scale_factors(configs)) == 4
    assert all(v == pytest.approx(measured, abs=1e-5) for v in scale_factors(configs).values())


def test_init_with_a_resumable_state_is_refused_unless_fresh(pretrain, capsys, caplog):
    script, data, _ = pretrain
    work = script.Path("work")
    work.mkdir()
    (work / "state.ckpt").write_bytes(b"a state of an earlier run")
    args = ["--stage", "diffusion", "--workdir", str(work), "--init", str(data / "toy-v1.safetensors")]
    assert script.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --init {data / 'toy-v1.safetensors'}: {work / 'state.ckpt'} "
                                               "holds a diffusion state to resume; pass --fresh")
    with caplog.at_level(logging.INFO):
        assert script.main([*args, "--fresh"]) == 1  # past the state: it goes on from --init (this work folder has no
    (line,) = capsys.readouterr().err.strip().splitlines()  # latents: one error line, from run_command)
    assert line.startswith("error: ") and "latents.npz" in line
    assert not (work / "state.ckpt").exists()
    assert any("--fresh: " in r.message and "is not resumed" in r.message for r in caplog.records)
