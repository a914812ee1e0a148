"""The state-dict specs kept in tests/fixtures (copies of the project's shared specs)."""
from tests.helpers.repo import REPO

SPEC = REPO / "tests" / "fixtures" / "sd-v1-state-dict.tsv"  # a copy of the project's shared spec


def read_spec() -> dict[str, tuple[int, ...]]:
    """Key -> shape of a Stable Diffusion v1 checkpoint, from the spec kept in tests/fixtures."""
    spec = {}
    for line in SPEC.read_text().splitlines():
        key, shape = line.split("\t")
        spec[key] = tuple(int(n) for n in shape.split("x"))
    return spec
