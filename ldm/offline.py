"""Imports of optional packages that stay off the Hugging Face hub. bitsandbytes, imported on a CPU with AVX-512
bf16, asks the hub (through the `kernels` package, which transformers installs) for a 4-bit matmul kernel and falls
back to its own without one; the 8-bit optimizer never uses that kernel."""
import importlib
import logging
import os
import sys
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"
# what bitsandbytes logs when the hub kernel is not fetched: noise, since only its 4-bit layers would use it
UNUSED_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
UNUSED_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward"


def import_offline(name: str) -> ModuleType:
    """The module `name`, imported with the hub switched off unless the environment sets HF_HUB_OFFLINE itself."""
    with hub_offline(), _dropped_warning(UNUSED_KERNEL_LOGGER, UNUSED_KERNEL_WARNING):
        return importlib.import_module(name)


@contextmanager
def hub_offline() -> Iterator[None]:
    """No hub access in the block: HF_HUB_OFFLINE=1 for a huggingface_hub imported inside it, and the flag that an
    already imported huggingface_hub reads at call time. A user's own HF_HUB_OFFLINE (0 or 1) is left as it is."""
    if HUB_OFFLINE_ENV in os.environ:
        yield
        return
    constants = sys.modules.get("huggingface_hub.constants")
    before = getattr(constants, HUB_OFFLINE_ENV, None)
    os.environ[HUB_OFFLINE_ENV] = "1"
    if constants is not None:
        setattr(constants, HUB_OFFLINE_ENV, True)
    try:
        yield
    finally:
        del os.environ[HUB_OFFLINE_ENV]
        if constants is not None:
            setattr(constants, HUB_OFFLINE_ENV, before)


@contextmanager
def _dropped_warning(logger_name: str, prefix: str) -> Iterator[None]:
    """The records that the logger `logger_name` logs starting with `prefix` are dropped in the block."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    logger = logging.getLogger(logger_name)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
