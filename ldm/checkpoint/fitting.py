"""Which of the repository's configs fits a weight file, when the one given does not: a shape mismatch in one line
that names the config to pass."""
from typing import Mapping, Optional

import torch
from omegaconf import DictConfig

from ldm.checkpoint.files import CheckpointError, ShapeMismatchError
from ldm.checkpoint.loading import check_compatible
from ldm.config import CONFIGS, read_yaml, shown
from ldm.util import instantiate_from_config


def fitting_config(file_shapes: Mapping[str, tuple[int, ...]]) -> Optional[str]:
    """The first repository config (configs/**/v1-inference.yaml) whose model takes tensors of these shapes."""
    file_state = {key: torch.empty(shape, device="meta") for key, shape in file_shapes.items()}
    for path in sorted(CONFIGS.glob("**/v1-inference.yaml")):
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model_state = instantiate_from_config(read_yaml(path).model).state_dict()
        try:
            check_compatible(model_state, file_state, str(path))
        except CheckpointError:
            continue
        return shown(path)
    return None


def with_fitting_config(err: ShapeMismatchError) -> CheckpointError:
    """`err` in one line that names the repository config that fits the file, when one does (`; try --config X`)."""
    fits = fitting_config(err.file_shapes)
    return CheckpointError(f"{err}; try --config {fits}" if fits else str(err))


def check_fits(config: DictConfig, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights that `config`'s model (built on the meta device) cannot take, as sampling does."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model_state = instantiate_from_config(config.model).state_dict()
    try:
        check_compatible(model_state, state, source)
    except ShapeMismatchError as err:
        raise with_fitting_config(err) from None
