"""scripts/compare.py: every model gets the same prompts and seeds, one picture (rows: models, columns: prompts),
a table of costs read from the runs' summary.json, and scores through the scorer interface."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from ldm.checkpoint import save_lora, save_weights
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


def run(tmp_path, files, *models):
    base, lora, prompts, _ = files
    args = ["--config", str(TINY_CONFIG), "--device", "cpu", "--prompts", str(prompts), "--n", "2", "--steps", "2",
            "--outdir", str(tmp_path)]
    for model in models:
        args += ["--model", model.format(base=base, lora=lora)]
    return compare.main(args)


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


def test_bad_model_specs_are_one_line_errors(tmp_path, files, capsys):
    assert run(tmp_path, files, "x={base}+") == 1
    assert "expected [LABEL=]CKPT[+LORA[:SCALE]]" in capsys.readouterr().err
    assert run(tmp_path, files, "x={base}+missing.safetensors") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.safetensors" in err


def test_model_spec_labels():
    assert ModelSpec.parse("a/b/base.ckpt") == ModelSpec("base", "a/b/base.ckpt", [])
    assert ModelSpec.parse("r8=s.ckpt+x/r8.safetensors:0.5+y.safetensors").loras == ["x/r8.safetensors:0.5",
                                                                                   "y.safetensors"]
    assert ModelSpec.parse("s.ckpt+x/dog.safetensors:0.5").label == "dog"
    with pytest.raises(UserError):
        ModelSpec.parse("=")


class FakeToyScorer:
    def __init__(self, answers):
        self.answers = answers

    def score_images(self, images):
        return self.answers[:len(images)]


def test_toy_scores_and_the_table_means():
    answers = [{"subject": True, "cls": "ball", "context": "snow"}, {"subject": False, "cls": "box", "context": "beach"}]
    scorer = ToyPromptScorer(FakeToyScorer(answers), "ball")
    images = [Image.new("RGB", (64, 64))] * 2
    snow = scorer(images, "a sks ball in the snow")
    bare = scorer(images, "photo of a ball")
    assert [s["prompt"] for s in snow] == [1.0, 0.0] and [s["prompt"] for s in bare] == [1.0, 0.0]
    scores = {"m": {"a sks ball in the snow": snow, "photo of a ball": bare}}
    (row,) = table_rows([{"model": "m"}], scores, ["a sks ball in the snow", "photo of a ball"])
    assert row["subject_fidelity"] == 0.5 and row["prompt_fidelity"] == 0.5
    assert row["a sks ball in the snow (subject / prompt)"] == "50 % / 50 %"
