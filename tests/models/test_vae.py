"""AutoencoderKL: SD v1 key layout (meta device), parity with diffusers on random weights, posterior maths."""
import copy
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.model import Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import count_params, instantiate_from_config
from tests.helpers.specs import read_spec

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "first_stage_model."


def first_stage_config(name: str):
    return OmegaConf.load(ROOT / "configs" / name / "v1-inference.yaml").model.params.first_stage_config


def spec_shapes() -> dict[str, tuple[int, ...]]:
    return {key[len(PREFIX):]: shape for key, shape in read_spec().items() if key.startswith(PREFIX)}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded noise shaped like trained weights: fan-in scaled matrices,
    norm gains near 1, small biases, so that activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:
                p.copy_(noise * p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def test_full_size_keys_and_shapes_match_sd_v1():
    with torch.device("meta"):
        model = instantiate_from_config(first_stage_config("stable-diffusion"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = spec_shapes()
    assert len(spec) == 248
    assert set(ours) == set(spec), f"missing {sorted(set(spec) - set(ours))}, extra {sorted(set(ours) - set(spec))}"
    wrong = {k: (ours[k], spec[k]) for k in spec if ours[k] != spec[k]}
    assert not wrong, f"shape mismatches (ours, spec): {wrong}"
    n = count_params(model)
    print(f"AutoencoderKL (SD v1) parameters: {n / 1e6:.2f} M")
    assert abs(n / 1e6 - 83.65) < 0.01


def diffusers_vae(ddconfig, embed_dim: int):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    n = len(ddconfig["ch_mult"])
    assert ddconfig["attn_resolutions"] == [] and ddconfig["z_channels"] == embed_dim, "diffusers cannot express it"
    return DiffusersAutoencoderKL(
        in_channels=ddconfig["in_channels"],
        out_channels=ddconfig["out_ch"],
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(ddconfig["ch"] * m for m in ddconfig["ch_mult"]),
        layers_per_block=ddconfig["num_res_blocks"],
        act_fn="silu",
        latent_channels=embed_dim,
        norm_num_groups=32,
        sample_size=ddconfig["resolution"],
    )


SECOND = {
    "embed_dim": 3,
    "ddconfig": {"double_z": True, "z_channels": 3, "resolution": 48, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2, 2], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
    "lossconfig": {"target": "torch.nn.Identity"},
}


# float64 shows the two implementations compute the same function; float32 differs only by rounding: the
# attention kernels' last-bit differences (~1 ulp) grow ~40x through the decoder's ~15 convolutions.
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}


@pytest.mark.parametrize(
    "params, image_hw",
    [(OmegaConf.to_container(first_stage_config("tiny").params), (64, 64)), (SECOND, (48, 40))],
    ids=["tiny", "ch_mult122-nres2"],
)
def test_parity_with_diffusers(params, image_hw):
    pytest.importorskip("diffusers", reason="diffusers is needed for the parity check")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    params = copy.deepcopy(params)
    params.pop("monitor", None)
    ours = AutoencoderKL(**params).eval()
    randomise(ours, seed=0)
    theirs = diffusers_vae(params["ddconfig"], params["embed_dim"]).eval()
    ldm_sd = {PREFIX + k: v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(convert_ldm_vae_checkpoint(ldm_sd, dict(theirs.config)), strict=True)

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, *image_hw, generator=gen) * 2 - 1
    f = 2 ** (len(params["ddconfig"]["ch_mult"]) - 1)
    latent_shape = (2, params["embed_dim"], image_hw[0] // f, image_hw[1] // f)
    z = torch.randn(latent_shape, generator=gen)
    for dtype, (enc_tol, dec_tol) in TOLERANCES.items():
        ours, theirs = ours.to(dtype), theirs._apply(lambda t: t.to(dtype))
        with torch.no_grad():
            mean, ref_mean = ours.encode(x.to(dtype)).mean, theirs.encode(x.to(dtype)).latent_dist.mean
            dec, ref_dec = ours.decode(z.to(dtype)), theirs.decode(z.to(dtype)).sample
        assert mean.shape == latent_shape and dec.shape == x.shape
        assert mean.abs().max() > 0.1 and dec.abs().max() > 0.1, "outputs too small for the comparison to mean much"
        enc_err = (mean - ref_mean).abs().max().item()
        dec_err = (dec - ref_dec).abs().max().item()
        print(f"parity {image_hw} {dtype}: encode mean max err {enc_err:.3e}, decode max err {dec_err:.3e} "
              f"(|dec| max {dec.abs().max():.2f})")
        assert enc_err <= enc_tol, f"{dtype} encode mean differs from diffusers by {enc_err:.3e} > {enc_tol}"
        assert dec_err <= dec_tol, f"{dtype} decode differs from diffusers by {dec_err:.3e} > {dec_tol}"


def test_attention_in_levels_and_unsupported_attn_type():
    cfg = dict(SECOND["ddconfig"], attn_resolutions=[24])
    enc = Encoder(**cfg)
    assert "down.1.attn.1.proj_out.weight" in enc.state_dict() and "down.0.attn.0.q.weight" not in enc.state_dict()
    assert enc(torch.zeros(1, 3, 48, 48)).shape == (1, 6, 12, 12)
    with pytest.raises(ValueError, match="attn_type 'linear' is not supported"):
        Encoder(**dict(cfg, attn_type="linear"))


def test_rejects_ckpt_path_and_weighted_loss():
    with pytest.raises(ValueError, match="--actual_resume"):
        AutoencoderKL(**SECOND, ckpt_path="vae.ckpt")
    with pytest.raises(ValueError, match="weightless loss"):
        AutoencoderKL(**dict(SECOND, lossconfig={"target": "torch.nn.Linear", "params": {"in_features": 1,
                                                                                       "out_features": 1}}))


def test_diagonal_gaussian():
    params = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    dist = DiagonalGaussianDistribution(params)
    a = dist.sample(torch.Generator().manual_seed(7))
    b = dist.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, dist.sample(torch.Generator().manual_seed(8)))
    assert torch.equal(dist.mode(), params[:, :4])
    assert torch.equal(dist.mode(), dist.mean)

    assert torch.allclose(dist.kl(dist), torch.zeros(2), atol=1e-5)
    standard = DiagonalGaussianDistribution(torch.zeros(2, 8, 4, 4))
    assert torch.allclose(standard.kl(), torch.zeros(2))
    assert torch.allclose(dist.kl(standard), dist.kl(), atol=1e-5)
    assert (dist.kl() > 0).all()
    # KL(N(1, 1) || N(0, 1)) = 1/2 per dimension, 64 dimensions per sample.
    shifted = DiagonalGaussianDistribution(torch.cat([torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)], dim=1))
    assert torch.allclose(shifted.kl(), torch.full((2,), 32.0))

    # NLL of the mean under N(0, 1) = D/2 log(2 pi).
    assert torch.allclose(standard.nll(torch.zeros(2, 4, 4, 4)), torch.full((2,), 32 * math.log(2 * math.pi)))

    det = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(det.sample(), det.mean) and torch.equal(det.kl(), torch.zeros(2))
    clamped = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 99.0)], 1))
    assert clamped.logvar.item() == 20.0
