"""Optional packages are imported with the Hugging Face hub switched off (ldm/util.py), and bitsandbytes' warning
about the hub kernel that it did not fetch is dropped."""
import logging
import os
import sys

import huggingface_hub.constants
import pytest
import torch

import ldm.optim.factory
from ldm.util import UNUSED_KERNEL_LOGGER, UNUSED_KERNEL_WARNING, import_offline

# a module that records, when imported, whether the hub was off for it and logs as bitsandbytes' CPU backend does
PROBE = f"""
import logging, os
import huggingface_hub.constants
SEEN = (os.environ.get("HF_HUB_OFFLINE"), huggingface_hub.constants.HF_HUB_OFFLINE)
logging.getLogger("{UNUSED_KERNEL_LOGGER}").warning("{UNUSED_KERNEL_WARNING} from kernels-community: no network")
logging.getLogger("{UNUSED_KERNEL_LOGGER}").warning("another warning")
"""


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """The name of a fresh probe module on sys.path."""
    (tmp_path / "hub_probe.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hub_probe", raising=False)
    yield "hub_probe"
    sys.modules.pop("hub_probe", None)


def test_the_hub_is_off_during_the_import_and_restored_after(probe, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert import_offline(probe).SEEN == ("1", True)
    assert "HF_HUB_OFFLINE" not in os.environ
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_a_users_own_setting_is_kept(probe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert import_offline(probe).SEEN == ("0", False)


def test_only_the_unused_kernel_warning_is_dropped(probe, caplog):
    with caplog.at_level(logging.WARNING):
        import_offline(probe)
    assert [record.getMessage() for record in caplog.records] == ["another warning"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the filter is gone after the import
        logging.getLogger(UNUSED_KERNEL_LOGGER).warning(UNUSED_KERNEL_WARNING)
    assert len(caplog.records) == 1


def test_optional_optimizers_are_imported_offline(monkeypatch):
    imported = []

    def record(name):
        imported.append(name)
        return import_offline(name)

    pytest.importorskip("lion_pytorch", reason="lion_pytorch is not installed (pip install lion-pytorch)")
    monkeypatch.setattr(ldm.optim.factory, "import_offline", record)
    ldm.optim.factory.make_optimizer({"target": "lion"}, [torch.nn.Parameter(torch.zeros(2))], lr=1e-4)
    assert imported == ["lion_pytorch"]
