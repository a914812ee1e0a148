"""Our own implementations of the rules other Stable Diffusion tools apply to our files (AUTOMATIC1111's web UI)."""
import collections
import pickle
import re
import zipfile
from pathlib import Path

import torch

# AUTOMATIC1111 modules/safe.py: a .ckpt is a zip whose entries are all <one folder>/data.pkl, /version or /data/<n>.
A1111_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
STORAGES = ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
            "BFloat16Storage", "float32")
A1111_GLOBALS = {("collections", "OrderedDict"), ("torch.nn.modules.container", "ParameterDict"),
                 ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
                 ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"), ("__builtin__", "set"),
                 ("pytorch_lightning.callbacks", "model_checkpoint"),
                 ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
                 *(("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_parameter",
                                                 "_rebuild_device_tensor_from_numpy")),
                 *(("torch", n) for n in STORAGES)}


class A1111Unpickler(pickle.Unpickler):
    """The web UI's restricted unpickler: storages are empty stand-ins, and only the globals above resolve."""

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module: str, name: str):
        if (module, name) not in A1111_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        if module == "collections":
            return collections.OrderedDict
        return super().find_class(module, name)


def check_a1111_ckpt(path: Path) -> list[str]:
    """Raise as the web UI would refuse `path`; return its zip entry names."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        bad = [n for n in names if not A1111_ZIP_NAMES.match(n)]
        assert not bad, f"{path.name}: AUTOMATIC1111 refuses the zip entries {bad}"
        (pkl,) = [n for n in names if n.endswith("/data.pkl")]
        with archive.open(pkl) as handle:
            A1111Unpickler(handle).load()
    return names


INFOTEXT_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's reading of a `parameters` chunk: prompt lines, an optional `Negative prompt:` line, and a last line
    of `Key: value` pairs separated by ", " (values with commas quoted)."""
    *lines, last = text.strip().split("\n")
    pairs = INFOTEXT_PARAM.findall(last)
    assert len(pairs) >= 3 and ", ".join(f"{k}: {v}" for k, v in pairs) == last.strip(), f"not infotext: {last!r}"
    result = {"Prompt": "", "Negative prompt": ""}
    key = "Prompt"
    for line in lines:
        if line.startswith("Negative prompt:"):
            key, line = "Negative prompt", line[len("Negative prompt:"):].strip()
        result[key] = (result[key] + "\n" + line).strip()
    result.update({k.strip(): v.strip() for k, v in pairs})
    return result
