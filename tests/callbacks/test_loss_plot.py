"""loss.png: every session's CSV read (a resumed step's later value wins), TensorBoard-style smoothing, the picture,
and validation's fidelity in a panel below the losses."""
from types import SimpleNamespace

import numpy as np
from PIL import Image

from ldm.callbacks.loss_plot import SIZE, LossPlot, draw_losses, read_losses
from ldm.images import smoothed


def write_session(run, name, rows):
    folder = run / "csv" / name
    folder.mkdir(parents=True)
    lines = ["epoch,step,train/loss,train/loss_instance,train/loss_class,train/lr"]
    lines += [f"0,{step},{a + b},{a},{b},1e-6" if b is not None else f"0,{step},,,,1e-6" for step, a, b in rows]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_sessions_are_joined_and_a_resumed_step_takes_the_later_value(tmp_path):
    write_session(tmp_path, "2026-01-01T00-00-00", [(0, 0.5, 0.25), (1, 0.4, 0.2), (2, 0.3, None)])
    write_session(tmp_path, "2026-01-02T00-00-00", [(1, 0.45, 0.22), (2, 0.35, 0.2)])
    series = read_losses(tmp_path)
    assert series["train/loss_instance"] == [(0, 0.5), (1, 0.45), (2, 0.35)]
    assert series["train/loss_class"] == [(0, 0.25), (1, 0.22), (2, 0.2)]
    assert "val/loss_instance" not in series


def test_smoothing_is_debiased_and_zero_smoothing_is_the_raw_values():
    assert smoothed([2.0, 2.0, 2.0], 0.9) == [2.0, 2.0, 2.0]  # no pull towards 0 at the start
    assert smoothed([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert 1.0 < smoothed([1.0, 3.0], 0.5)[1] < 3.0


def test_the_picture_shows_both_series_in_their_colours(tmp_path):
    write_session(tmp_path, "s", [(k, 1.0 / (k + 1), 0.5) for k in range(50)])
    image = draw_losses(read_losses(tmp_path), 0.9, "run")
    assert image.size == SIZE
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    for colour in ((31, 119, 180), (214, 39, 40)):
        assert (np.abs(pixels - colour).sum(1) < 30).sum() > 50, colour
    image.save(tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").format == "PNG"


def test_the_validation_fidelity_is_a_panel_below_the_losses(tmp_path):
    write_session(tmp_path, "s", [(k, 1.0 / (k + 1), 0.5) for k in range(50)])
    trainer = SimpleNamespace(is_global_zero=True, loggers=[], default_root_dir=str(tmp_path))
    assert Image.open(LossPlot().plot(trainer)).size == SIZE
    with open(tmp_path / "csv" / "s" / "metrics.csv", "a") as handle:  # validation rounds log their own rows
        handle.writelines(f"0,{step},,,,,{value}\n" for step, value in ((10, 0.3), (30, 0.7), (49, 0.6)))
    header = (tmp_path / "csv" / "s" / "metrics.csv").read_text().splitlines()[0]
    text = (tmp_path / "csv" / "s" / "metrics.csv").read_text().replace(header, header + ",val/fidelity", 1)
    (tmp_path / "csv" / "s" / "metrics.csv").write_text(text)
    assert read_losses(tmp_path)["val/fidelity"] == [(10, 0.3), (30, 0.7), (49, 0.6)]
    image = Image.open(LossPlot().plot(trainer))
    assert image.size == (SIZE[0], 2 * SIZE[1])
    panel = np.asarray(image.convert("RGB"))[SIZE[1]:].reshape(-1, 3)
    assert (np.abs(panel - (255, 127, 14)).sum(1) < 30).sum() > 50  # the fidelity curve's colour
