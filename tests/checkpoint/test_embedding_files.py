"""Embedding files: both formats round-trip (A1111's .pt read with weights_only=True, the .safetensors with one
`emb_params` tensor), other files are told apart, and `--embedding` binds a file's vectors to its word at sampling
(txt2img, compare, evaluate), refusing a width that is not the text encoder's."""
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, read_embedding, save_embedding, save_weights
from ldm.embeddings.files import apply_embedding_files, check_embedding_specs, parse_embedding_spec
from ldm.eval.compare import ModelSpec
from ldm.eval.generation import SampleSettings, sample_model
from ldm.images import read_metadata
from ldm.util import UserError
from tests.helpers.models import build_tiny_model
from tests.helpers.repo import TINY_CONFIG


def test_the_safetensors_file_holds_emb_params_with_its_name_and_step(tmp_path):
    vectors = torch.randn(3, 32)
    save_embedding(vectors, tmp_path / "sks.safetensors", "sks", 40, "base.ckpt", "ab" * 32)
    with safe_open(str(tmp_path / "sks.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        assert handle.metadata() == {"name": "sks", "step": "40", "sd_checkpoint": "ab" * 5,
                                     "sd_checkpoint_name": "base.ckpt"}
    found = read_embedding(tmp_path / "sks.safetensors")
    assert torch.equal(found.vectors, vectors) and found.name == "sks"


def test_the_pt_file_is_a1111s_format_and_loads_with_weights_only(tmp_path):
    vectors = torch.randn(2, 32)
    save_embedding(vectors, tmp_path / "file-stem.pt", "ohwx", 7, "base.ckpt", "cd" * 32)
    content = torch.load(tmp_path / "file-stem.pt", weights_only=True)
    assert content["string_to_token"] == {"*": 265} and torch.equal(content["string_to_param"]["*"], vectors)
    assert (content["name"], content["step"], content["sd_checkpoint"]) == ("ohwx", 7, "cd" * 5)
    found = read_embedding(tmp_path / "file-stem.pt")
    assert torch.equal(found.vectors, vectors) and (found.name, found.step) == ("ohwx", 7)


def test_other_layouts_a1111_reads_are_read_too(tmp_path):
    save_file({"anything": torch.randn(32)}, str(tmp_path / "flat.safetensors"))  # one tensor, one vector
    assert read_embedding(tmp_path / "flat.safetensors").vectors.shape == (1, 32)
    torch.save({"<cat-toy>": torch.randn(32)}, tmp_path / "learned_embeds.bin")  # diffusers' file
    found = read_embedding(tmp_path / "learned_embeds.bin")
    assert found.name == "<cat-toy>" and found.vectors.shape == (1, 32)


@pytest.mark.parametrize("tensors, message", [
    ({"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)},
     "is a LoRA file, not an embedding: pass it with --lora"),
    ({"a": torch.zeros(2), "b": torch.zeros(2)}, "is not an embedding file: expected one tensor"),
    ({"emb_params": torch.full((1, 4), float("nan"))}, "NaN or inf"),
])
def test_a_file_that_is_no_embedding_is_a_clear_error(tmp_path, tensors, message):
    save_weights(tensors, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=message):
        read_embedding(tmp_path / "x.safetensors")


def test_a_missing_or_unreadable_file_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.pt"):
        check_embedding_specs([str(tmp_path / "missing.pt")])
    (tmp_path / "page.safetensors").write_text("<html>not found</html>")
    with pytest.raises(CheckpointError, match="web page"):
        check_embedding_specs([str(tmp_path / "page.safetensors")])


def test_spec_names_the_word_after_a_colon():
    assert parse_embedding_spec("a/sks.pt") == ("a/sks.pt", None)
    assert parse_embedding_spec("a/step_4.safetensors:sks") == ("a/step_4.safetensors", "sks")
    with pytest.raises(UserError, match="expected FILE or FILE:WORD"):
        parse_embedding_spec("a/step_4.safetensors: ")


def test_sampling_binds_the_file_to_its_word_and_refuses_another_width(tmp_path):
    model = build_tiny_model()
    dog = model.cond_stage_model.embed_word("dog", "test")
    save_embedding(dog, tmp_path / "sks.safetensors", "ignored-name", 1)
    records = apply_embedding_files(model, [str(tmp_path / "sks.safetensors")])
    assert records[0]["word"] == "sks" and records[0]["vectors"] == 1 and len(records[0]["sha256"]) == 64
    with torch.no_grad():
        assert torch.allclose(model.get_learned_conditioning(["a photo of sks"]),
                              model.get_learned_conditioning(["a photo of dog"]), atol=1e-6)
    save_embedding(torch.randn(2, 768), tmp_path / "sd15.pt", "wide", 1)
    with pytest.raises(UserError, match="its vectors are 768 wide, but this model's text encoder takes 32"):
        apply_embedding_files(model, [str(tmp_path / "sd15.pt")])


def test_compare_and_evaluate_bind_the_embedding_in_every_model_and_record_it(tiny_ckpt, tmp_path):
    save_embedding(torch.randn(2, 32), tmp_path / "ohwx.pt", "ohwx", 3)
    settings = SampleSettings([0], steps=1, config=str(TINY_CONFIG), embeddings=[str(tmp_path / "ohwx.pt")])
    sample_model(ModelSpec.parse(str(tiny_ckpt)), settings, ["a photo of ohwx dog"], torch.device("cpu"),
                 tmp_path / "out")
    metadata = read_metadata(tmp_path / "out" / "00-0.png")
    assert [(r["file"], r["word"], r["vectors"]) for r in metadata["embeddings"]] == [("ohwx.pt", "ohwx", 2)]
    assert 'TI hashes: "ohwx: ' in Image.open(tmp_path / "out" / "00-0.png").text["parameters"]
