"""The paper's evaluation: preprocessing equal to transformers' image processors, DINO / CLIP-I / CLIP-T equal to a
direct computation with transformers, DreamBench's prompts (scripts/evaluate.py end to end on tiny models saved to local
folders by the test: tests/e2e/test_evaluate_e2e.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import save_embedding
from ldm.eval.evaluate import dreambench_prompts, prompt_groups
from ldm.eval.paper_metrics import PaperScorer, without_identifier
from ldm.modules.encoders.preprocess import Preprocess
from ldm.modules.encoders.vision import ClipEmbedder, DinoEmbedder
from tests.helpers.models import save_tiny_scorers
from tests.helpers.repo import load_script

transformers = pytest.importorskip("transformers", reason="transformers holds the reference models")
evaluate_script = load_script("evaluate")
ODD_SIZES = [(301, 199), (123, 457), (64, 64), (250, 251)]


def photos(seed: int, sizes=ODD_SIZES) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for width, height in sizes:
        gradient = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
        noise = rng.integers(0, 60, (height, width, 3))
        images.append(Image.fromarray(np.clip(gradient * 0.7 + noise, 0, 255).astype(np.uint8)))
    return images


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_scorers(tmp_path_factory.mktemp("scorers"))


@pytest.mark.parametrize("kind,processor", [("clip", "CLIPImageProcessorPil"), ("vit", "ViTImageProcessorPil")])
@pytest.mark.parametrize("config", [{}, {"size": 40, "crop_size": 24}])
def test_preprocessing_equals_the_transformers_processor(tmp_path, kind, processor, config) -> None:
    getattr(transformers, processor)(**config).save_pretrained(tmp_path)
    reference = getattr(transformers, processor).from_pretrained(str(tmp_path))
    images = photos(1)
    if kind == "clip":
        images.append(images[0].convert("RGBA"))  # CLIP's processor drops an alpha channel (ViT's cannot take one)
    expected = torch.as_tensor(np.stack(reference(images=images, return_tensors="np")["pixel_values"]))
    ours = Preprocess.from_folder(tmp_path, kind)(images)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= 1e-5


def test_metrics_equal_a_direct_computation(folders) -> None:
    clip_dir, dino_dir = folders
    clip, dino = ClipEmbedder(clip_dir), DinoEmbedder(dino_dir)
    real, generated = photos(2), photos(3, sizes=[(64, 64), (80, 48), (33, 90)])
    scores = PaperScorer(clip, dino, real, "sks")(generated, "a sks dog on the beach")
    processor = transformers.CLIPImageProcessorPil.from_pretrained(str(clip_dir))
    model = transformers.CLIPModel.from_pretrained(str(clip_dir)).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(clip_dir))
    vit = transformers.ViTModel.from_pretrained(str(dino_dir), add_pooling_layer=False).eval()
    vit_processor = transformers.ViTImageProcessorPil.from_pretrained(str(dino_dir))

    def unit(x):
        x = x if isinstance(x, torch.Tensor) else x.pooler_output
        return x / x.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        def clip_images(images):
            return unit(model.get_image_features(**processor(images=images, return_tensors="pt")))

        def dino_images(images):
            return unit(vit(**vit_processor(images=images, return_tensors="pt")).last_hidden_state[:, 0])

        text = unit(model.get_text_features(**tokenizer(["a dog on the beach"], return_tensors="pt")))
        expected_clip_i = (clip_images(generated) @ clip_images(real).T).mean(1)
        expected_dino = (dino_images(generated) @ dino_images(real).T).mean(1)
        expected_clip_t = (clip_images(generated) @ text.T)[:, 0]
        real_clip = clip_images(real)
    for score, c, d, t in zip(scores, expected_clip_i, expected_dino, expected_clip_t):
        assert abs(score["clip_i"] - float(c)) <= 1e-5
        assert abs(score["dino"] - float(d)) <= 1e-5
        assert abs(score["clip_t"] - float(t)) <= 1e-5
    n = len(real)
    pairs = [float(real_clip[i] @ real_clip[j]) for i in range(n) for j in range(n) if i != j]
    expected_real = sum(pairs) / len(pairs)
    baseline = PaperScorer(clip, dino, real, "sks").real_baseline()
    assert abs(baseline["clip_i"] - expected_real) <= 1e-5 and -1 <= baseline["dino"] <= 1


def test_dreambench_prompts_and_groups() -> None:
    objects, live = dreambench_prompts("object", "sks", "can"), dreambench_prompts("live", "sks", "dog")
    assert len(objects) == len(live) == 25 and all("sks" in p for p in objects + live)
    assert objects[0] == "a sks can in the jungle" and live[-1] == "a cube shaped sks dog"
    assert [(name, len(p)) for name, p in prompt_groups(live, "live")] == [
        ("recontextualization", 10), ("accessorization", 10), ("property", 5)]
    assert without_identifier("a sks dog on the beach", "sks") == "a dog on the beach"
    assert without_identifier("a red sks dog", "sks") == "a red dog"


def test_a_missing_scoring_model_says_what_to_download(tmp_path, tiny_ckpt, capsys) -> None:
    (tmp_path / "photos").mkdir()
    photos(4)[0].save(tmp_path / "photos" / "a.png")
    code = evaluate_script.main(["--model", str(tiny_ckpt), "--photos", str(tmp_path / "photos"), "--class_word",
                                 "dog", "--clip", str(tmp_path / "nothing"), "--dino", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "openai/clip-vit-base-patch32" in err and "Traceback" not in err


def test_the_model_spec_takes_an_embedding_and_resolves_globs(tmp_path, tiny_ckpt) -> None:
    run = tmp_path / "logs" / "2024_dog" / "checkpoints"
    run.mkdir(parents=True)
    save_embedding(torch.randn(1, 32), run / "last.safetensors", "sks", 3)
    pattern = f"{tmp_path}/logs/*_{{subject}}/checkpoints/last.safetensors:sks"
    spec = evaluate_script.resolve_model(f"ti={tiny_ckpt}+{pattern}", "dog")
    assert (spec.loras, spec.embeddings) == ([], [f"{run / 'last.safetensors'}:sks"])
    assert evaluate_script.default_outdir(spec) == run.parent / "eval"
