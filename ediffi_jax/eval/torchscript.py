"""The tensors and attributes of a TorchScript archive (`torch.jit.save`'s zip), read with numpy.

The archive is a zip of `<root>/data.pkl` (the module tree, pickled) and `<root>/data/<key>`
(one raw storage per tensor). A restricted unpickler rebuilds it without torch: scripted module
classes become stand-ins that keep their attribute dict, tensors become numpy views of their
storage (offset, shape and strides as pickled), copied so they own their memory. Only the few
globals a module pickle uses are allowed, so loading a file runs no code from it.
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any

import numpy as np

# Storage class name -> element type (byte order is set from the archive's `byteorder` record).
STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "b1",
}


class TorchScriptError(ValueError):
    """The file is not a readable TorchScript archive (the message names the file and why)."""


class ScriptedModule:
    """Stand-in for a `__torch__.*` class: pickle hands its attributes to __setstate__."""

    def __setstate__(self, state):
        self.attributes = state


def _identity(x):
    return x


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, storage):
        super().__init__(file)
        self._path = path
        self._storage = storage

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return type(name, (ScriptedModule,), {"torch_class": f"{module}.{name}"})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return _identity  # build_intlist & co. wrap plain lists
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise TorchScriptError(f"{self._path}: data.pkl needs {module}.{name}, which a module "
                               "archive of parameters and plain attributes does not use")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchScriptError(f"{self._path}: unexpected persistent id {pid!r} in data.pkl")
        _, storage_type, key, _location, numel = pid
        return self._storage(storage_type, str(key), int(numel))

    def _rebuild_tensor(self, storage, offset, shape, strides, *_):
        shape, strides = tuple(shape), tuple(strides)
        if any(s < 0 for s in strides):
            raise TorchScriptError(f"{self._path}: a tensor has negative strides {strides}")
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else offset
        if offset < 0 or (all(shape) and last >= storage.size):
            raise TorchScriptError(f"{self._path}: a tensor of shape {shape}, strides {strides} "
                                   f"at offset {offset} reaches past its storage of "
                                   f"{storage.size} elements")
        view = np.lib.stride_tricks.as_strided(
            storage[offset:], shape, [s * storage.itemsize for s in strides], writeable=False)
        return np.array(view)


def read_archive(path: str) -> dict[str, Any]:
    """Every leaf of the pickled module tree, by dotted name: tensors as numpy arrays (e.g.
    'net.layers.conv.weight'), other attributes as they were pickled (e.g. '...conv.padding')."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected a TorchScript archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if not pickles:
                raise TorchScriptError(f"{path}: a zip without <root>/data.pkl is not a "
                                       "TorchScript archive")
            root = pickles[0].split("/")[0]
            order = f"{root}/byteorder"
            big = order in names and archive.read(order).strip() == b"big"

            def storage(storage_type: str, key: str, numel: int) -> np.ndarray:
                if storage_type not in STORAGE_DTYPES:
                    raise TorchScriptError(f"{path}: unsupported storage type {storage_type}")
                dtype = np.dtype((">" if big else "<") + STORAGE_DTYPES[storage_type])
                name = f"{root}/data/{key}"
                if name not in names:
                    raise TorchScriptError(f"{path}: storage {name} is missing")
                data = archive.read(name)
                if len(data) < numel * dtype.itemsize:
                    raise TorchScriptError(f"{path}: storage {name} holds {len(data)} bytes, "
                                           f"{numel} x {dtype.itemsize} expected")
                return np.frombuffer(data, dtype, count=numel)

            with archive.open(f"{root}/data.pkl") as f:
                tree = _ArchiveUnpickler(f, path, storage).load()
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError) as e:
        raise TorchScriptError(f"{path}: damaged or not a TorchScript archive "
                               f"({type(e).__name__}: {e})") from e
    if not isinstance(tree, ScriptedModule):
        raise TorchScriptError(f"{path}: data.pkl holds a {type(tree).__name__}, not a scripted "
                               "module (is it a torch.save file rather than torch.jit.save?)")
    return _flatten(tree)


def _flatten(node: ScriptedModule, prefix: str = "") -> dict[str, Any]:
    leaves: dict[str, Any] = {}
    for name, value in getattr(node, "attributes", {}).items():
        if isinstance(value, ScriptedModule):
            leaves.update(_flatten(value, f"{prefix}{name}."))
        else:
            leaves[f"{prefix}{name}"] = value
    return leaves


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Only the tensors of `read_archive`."""
    return {k: v for k, v in read_archive(path).items() if isinstance(v, np.ndarray)}
