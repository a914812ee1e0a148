"""scripts/compare.py: every model gets the same prompts and seeds, one picture (rows: models, columns: prompts),
a table of costs read from the runs' summary.json, and scores through the scorer interface; a model may carry its own
textual-inversion embedding (`+FILE:WORD`)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import save_embedding, save_lora, save_weights
from ldm.eval.compare import ModelSpec, table_rows
from ldm.lora.layers import inject_lora, lora_tensors
from ldm.toy.scorer import ToyPromptScorer
from ldm.util import UserError
from tests.helpers.repo import TINY_CONFIG, load_script
from tests.lora.test_lora import NAMES, randomise_lora, tiny

compare = load_script("compare")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny base, and a LoRA for it inside a fake run folder with its summary.json."""
    root = tmp_path_factory.mktemp("compare")
    base = root / "base.ckpt"
    save_weights(tiny().state_dict(), base)
    model = tiny()
    inject_lora(model, NAMES, rank=4)
    randomise_lora(model)
    lora = root / "run" / "checkpoints" / "last.safetensors"
    lora.parent.mkdir(parents=True)
    tensors = lora_tensors(model, NAMES)
    save_lora(tensors, lora, base_hash="")
    summary = {"steps": 4, "seconds_per_step": 0.25, "peak_memory_bytes": 123, "peak_memory": "1.0 GB (x)",
               "trainable_parameters": 4321}
    (root / "run" / "summary.json").write_text(json.dumps(summary))
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of sks dog\na photo of a dog\n")
    return base, lora, prompts, sum(v.numel() for k, v in tensors.items() if not k.endswith(".alpha"))


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """Two runs' vectors for the same word (the tiny text encoder is 32 wide): a .safetensors and an A1111 .pt."""
    root = tmp_path_factory.mktemp("embeddings")
    save_embedding(torch.randn(1, 32, generator=torch.Generator().manual_seed(1)), root / "a.safetensors", "a", 5)
    save_embedding(torch.randn(2, 32, generator=torch.Generator().manual_seed(2)), root / "b.pt", "b", 5)
    return root / "a.safetensors", root / "b.pt"


def run(tmp_path, files, *models, extra=()):
    base, lora, prompts, _ = files
    args = ["--config", str(TINY_CONFIG), "--device", "cpu", "--prompts", str(prompts), "--n", "2", "--steps", "2",
            "--outdir", str(tmp_path), *extra]
    for model in models:
        args += ["--model", model.format(base=base, lora=lora)]
    return compare.main(args)


def pixels(folder):
    """The images of the first prompt (`a photo of sks dog`) in a samples/<label>/ folder."""
    return [np.asarray(Image.open(path)) for path in sorted(folder.glob("00-*.png"))]


def test_grid_table_and_fixed_seeds(tmp_path, files, capsys):
    base, lora, _, _ = files
    assert run(tmp_path, files, "base={base}", "again={base}", "r4={base}+{lora}:1.0") == 0
    assert "| model |" in capsys.readouterr().out
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (110 + 2 * 150, 48 + 3 * (2 + 66 + 4))  # 2 images tiled 2 wide: 134 x 68, min width 150
    samples = {label: sorted((tmp_path / "samples" / label).glob("*.png")) for label in ("base", "again", "r4")}
    assert [len(v) for v in samples.values()] == [4, 4, 4]
    same = [np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
            for a, b in zip(samples["base"], samples["again"])]
    changed = [np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
               for a, b in zip(samples["base"], samples["r4"])]
    assert all(same) and not any(changed)
    rows = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert [r["model"] for r in rows] == ["base", "again", "r4"]
    assert float(rows[0]["file_mb"]) == pytest.approx(base.stat().st_size / 1e6)
    assert rows[0]["trainable_parameters"] == "" and rows[0]["seconds_per_step"] == ""
    assert float(rows[2]["file_mb"]) == pytest.approx(lora.stat().st_size / 1e6)
    assert (rows[2]["trainable_parameters"], rows[2]["seconds_per_step"]) == ("4321", "0.25")


def test_lora_parameters_are_counted_from_the_file_without_a_summary(tmp_path, files):
    base, lora, _, numel = files
    elsewhere = tmp_path / "r.safetensors"
    elsewhere.write_bytes(lora.read_bytes())
    assert run(tmp_path, files, f"{{base}}+{elsewhere}") == 0
    (row,) = csv.DictReader(open(tmp_path / "table.csv"))
    assert row["model"] == "r" and int(row["trainable_parameters"]) == numel


def test_bad_model_specs_are_one_line_errors(tmp_path, files, embeddings, capsys):
    emb, _ = embeddings
    save_weights({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "other.safetensors")
    for model, message in [("x={base}+", "expected [LABEL=]CKPT[+LORA[:SCALE]][+EMBEDDING[:WORD]]"),
                           ("x={base}+missing.safetensors", "missing.safetensors"),
                           (f"x={{base}}+{tmp_path / 'other.safetensors'}", "must be a LoRA or an embedding file"),
                           ("x={base}+{lora}:sks", "is a LoRA file, so its :sks must be a scale"),
                           (f"x={{base}}+{emb}:0.5", "is a textual-inversion embedding, so its :0.5 must be the word")]:
        assert run(tmp_path, files, model) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (model, err)


def test_model_spec_labels_and_parts(files, embeddings):
    base, lora, _, _ = files
    emb, pt = embeddings
    assert ModelSpec.parse("a/b/base.ckpt") == ModelSpec("base", "a/b/base.ckpt", [])
    spec = ModelSpec.parse(f"pivotal={base}+{lora}:0.5+{emb}:sks+{pt}")
    assert (spec.label, spec.loras, spec.embeddings) == ("pivotal", [f"{lora}:0.5"], [f"{emb}:sks", str(pt)])
    assert spec.files() == [lora, emb, pt]
    assert ModelSpec.parse(f"{base}+{lora}:0.5").label == "last"
    assert ModelSpec.parse(f"{base}+{emb}:sks").label == "a"
    with pytest.raises(UserError):
        ModelSpec.parse("=")


def test_each_model_binds_its_own_embedding_after_the_global_one(tmp_path, files, embeddings):
    emb, pt = embeddings
    assert run(tmp_path, files, f"a={{base}}+{emb}:sks", f"b={{base}}+{pt}:sks", "g={base}",
               extra=["--embedding", f"{pt}:sks"]) == 0
    a, b, g = (pixels(tmp_path / "samples" / label) for label in "abg")
    assert len(a) == 2 and all(np.array_equal(x, y) for x, y in zip(b, g))  # the model's own = the global, same seeds
    assert not any(np.array_equal(x, y) for x, y in zip(a, b))  # a's own vectors win over the global ones
    rows = {r["model"]: r for r in csv.DictReader(open(tmp_path / "table.csv"))}
    assert (rows["a"]["trainable_parameters"], rows["b"]["trainable_parameters"]) == ("32", "64")
    assert float(rows["a"]["file_mb"]) == pytest.approx(emb.stat().st_size / 1e6)


class FakeToyScorer:
    def __init__(self, answers):
        self.answers = answers

    def score_images(self, images):
        return self.answers[:len(images)]


def test_toy_scores_and_the_table_means():
    answers = [{"subject": True, "cls": "ball", "context": "snow"},
               {"subject": False, "cls": "box", "context": "beach"}]
    scorer = ToyPromptScorer(FakeToyScorer(answers), "ball")
    images = [Image.new("RGB", (64, 64))] * 2
    snow = scorer(images, "a sks ball in the snow")
    bare = scorer(images, "photo of a ball")
    assert [s["prompt"] for s in snow] == [1.0, 0.0] and [s["prompt"] for s in bare] == [1.0, 0.0]
    scores = {"m": {"a sks ball in the snow": snow, "photo of a ball": bare}}
    (row,) = table_rows([{"model": "m"}], scores, ["a sks ball in the snow", "photo of a ball"])
    assert row["subject_fidelity"] == 0.5 and row["prompt_fidelity"] == 0.5
    assert row["a sks ball in the snow (subject / prompt)"] == "50 % / 50 %"
