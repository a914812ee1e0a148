"""UNetModel: SD v1 key layout at full size, parity with diffusers' UNet2DConditionModel, gradient checkpointing."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint.diffusers import diffusers_unet_config
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.util import count_params, instantiate_from_config
from tests.helpers.specs import read_spec

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "model.diffusion_model."


def unet_params(config: str) -> dict:
    """The `unet_config.params` of a model YAML under configs/."""
    cfg = OmegaConf.load(ROOT / "configs" / config)
    return OmegaConf.to_container(cfg.model.params.unet_config.params)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter (zero-initialised ones included) with seeded noise that keeps activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def test_full_size_matches_sd_v1_state_dict_on_meta() -> None:
    expected = {k[len(PREFIX):]: shape for k, shape in read_spec().items() if k.startswith(PREFIX)}
    assert len(expected) == 686
    cfg = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model.params.unet_config)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == [], "unexpected keys"
    assert sorted(set(expected) - set(got)) == [], "missing keys"
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert wrong == {}, "shape mismatches (got, expected)"
    n = count_params(model)
    print(f"full-size SD v1 UNet: {n / 1e6:.2f} M parameters")
    assert n == 859_520_964


def test_timestep_embedding_cos_first() -> None:
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))


def diffusers_twin(params: dict):
    """An equivalently configured diffusers UNet2DConditionModel (SD v1 conventions)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the parity test")
    return diffusers.UNet2DConditionModel(**diffusers_unet_config(params))


SECOND_CONFIG = dict(
    image_size=16, in_channels=4, out_channels=3, model_channels=32, num_res_blocks=2,
    attention_resolutions=[2, 1], channel_mult=[1, 1, 2], num_heads=4, use_spatial_transformer=True,
    transformer_depth=2, context_dim=24, legacy=False,
)


@pytest.mark.parametrize(
    "params,sizes",
    [
        (unet_params("tiny/v1-inference.yaml"), [(8, 8), (6, 10)]),
        (SECOND_CONFIG, [(8, 8), (12, 16)]),
    ],
    ids=["tiny", "three-levels"],
)
def test_parity_with_diffusers(params: dict, sizes: list) -> None:
    convert = pytest.importorskip("diffusers.loaders.single_file_utils").convert_ldm_unet_checkpoint
    torch.manual_seed(0)
    ours = UNetModel(**params).eval()
    randomise(ours, seed=1)
    theirs = diffusers_twin(params).eval()
    state = {PREFIX + k: v for k, v in ours.state_dict().items()}
    converted = convert(state, dict(theirs.config))
    theirs.load_state_dict(converted, strict=True)
    assert len(converted) == len(state)

    gen = torch.Generator().manual_seed(2)
    for h, w in sizes:
        x = torch.randn(2, params["in_channels"], h, w, generator=gen)
        t = torch.tensor([3, 917])
        context = torch.randn(2, 7, params["context_dim"], generator=gen)
        with torch.no_grad():
            a = ours(x, t, context)
            b = theirs(x, t, encoder_hidden_states=context).sample
        assert a.shape == (2, params["out_channels"], h, w)
        err = (a - b).abs().max().item()
        print(f"parity {h}x{w}: max |ours - diffusers| = {err:.3e}, output std {a.std().item():.3f}")
        assert a.std() > 0.1, "outputs too small for the tolerance to mean anything"
        assert err <= 1e-5, f"max abs error {err:.3e} at latent size {h}x{w}"


def test_gradient_checkpointing_is_used_and_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    params = unet_params("tiny/v1-inference.yaml")
    torch.manual_seed(0)
    plain = UNetModel(**{**params, "use_checkpoint": False}).train()
    randomise(plain, seed=3)
    ckpt = UNetModel(**{**params, "use_checkpoint": True}).train()
    ckpt.load_state_dict(plain.state_dict())

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([5, 500])
    context = torch.randn(2, 77, params["context_dim"], generator=gen)

    plain(x, t, context).square().mean().backward()
    assert calls == [], "checkpointing ran with use_checkpoint=False"
    ckpt(x, t, context).square().mean().backward()
    n_blocks = sum(type(m).__name__ in ("ResBlock", "BasicTransformerBlock") for m in ckpt.modules())
    assert len(calls) == n_blocks and set(calls) == {False}

    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")

    calls.clear()
    with torch.no_grad():
        ckpt(x, t, context)
    assert calls == [], "checkpointing ran without grad"
