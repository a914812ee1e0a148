"""scripts/benchmarks/optimizers.py: the UNet's shapes from the meta device, a row per optimizer, a skip line for an
unknown one."""
import re

from tests.helpers.repo import TINY_CONFIG, load_script

benchmark = load_script("benchmarks/optimizers")


def test_it_takes_the_unets_first_shapes():
    shapes = benchmark.unet_shapes(str(TINY_CONFIG))
    assert len(shapes) > 100 and all(s.numel() > 0 for s in shapes)
    taken = benchmark.take(shapes, 0.01)
    assert 0 < sum(s.numel() for s in taken) <= 10_000 and taken == shapes[:len(taken)]
    assert benchmark.take(shapes, 0) == shapes and len(benchmark.take(shapes, 1e-9)) == 1


def test_it_prints_a_row_per_optimizer_and_skips_an_unknown_one(capsys):
    assert benchmark.main(["--config", str(TINY_CONFIG), "--million", "0.05", "--optimizers", "adamw,adafactor,nope",
                           "--steps", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert float(rows["adamw"][-1]) == 8.0  # two fp32 moments per parameter
    assert re.fullmatch(r"[\d.]+s", rows["adafactor"][1]) and float(rows["adafactor"][-1]) < 8.0
    assert rows["nope"][0] == "skipped:" and "unknown optimizer 'nope'" in out
