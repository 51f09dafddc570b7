"""Reading NVIDIA's network pickles (stylegan2-ada-pytorch, stylegan3) without their code.

NVIDIA pickles whole ``torch.nn.Module`` objects with plain :mod:`pickle`. Their
classes are wrapped by ``torch_utils.persistence``, so each module is stored as a
call ``_reconstruct_persistent_obj(meta)`` whose ``meta`` holds the *source code*
of the module that defined the class, the class name, and the object's
``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, plain attributes).
Unpickling it normally would ``exec`` that source and import NVIDIA's packages.

:class:`RestrictedUnpickler` runs nothing it does not know: only the handful of
torch rebuild functions that turn stored bytes into tensors (storages are read
with ``torch.load(weights_only=True)``), ``collections.OrderedDict``,
``set``/``frozenset`` and latin-1 ``_codecs.encode`` (protocol 2's bytes) are
real. Every other class or function named in the stream becomes a
:class:`Stub` that records its arguments and state and is never called, so the
source code is kept as a string and never executed.
:func:`module_tree` then reads a module's tensors and plain attributes back out
of the stubs.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from likeness.errors import LikenessError

PERSISTENT_RECONSTRUCT = "torch_utils.persistence._reconstruct_persistent_obj"


class Stub:
    """Stands in for a class or function the unpickler does not trust.

    Calling it, ``__new__``-ing it, giving it state or items only records them.
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        obj = object.__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        obj.items = {}
        obj.elements = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # state lives in __new__
        pass

    # What the pickle machine may do to an object it built.
    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.elements.append(value)

    def extend(self, values: Any) -> None:
        self.elements.extend(values)

    def add(self, value: Any) -> None:
        self.elements.append(value)

    def __repr__(self) -> str:
        return f"<stub {self.qualname}>"


def _stub_class(module: str, name: str) -> type[Stub]:
    return type(name, (Stub,), {"qualname": f"{module}.{name}", "__module__": __name__})


def _load_storage_bytes(data: bytes) -> Any:
    """``torch.storage._load_from_bytes``, restricted: a storage saved by ``torch.save``."""
    if not isinstance(data, bytes | bytearray):
        raise pickle.UnpicklingError("a storage must be stored as bytes")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"expected a tensor storage, got {type(storage).__name__}")
    return storage


def _is_ints(value: Any) -> bool:
    return isinstance(value, tuple | list | torch.Size) and all(isinstance(v, int) for v in value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> Tensor:
    """``torch._utils._rebuild_tensor_v2`` minus gradients and hooks, with its inputs checked."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a tensor must be rebuilt from a typed tensor storage")
    if (
        not isinstance(offset, int)
        or not _is_ints(size)
        or not _is_ints(stride)
        or len(size) != len(stride)
        or offset < 0
        or min((*size, *stride), default=0) < 0
    ):
        raise pickle.UnpicklingError("malformed tensor metadata")
    # set_() does not check bounds: a view past the storage's end would read foreign memory.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        if all(size) and last >= storage.size():
            raise pickle.UnpicklingError("a tensor reaches past the end of its storage")
        return torch._utils._rebuild_tensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> Tensor:
    """``torch._utils._rebuild_parameter(_with_state)``: keep the plain tensor."""
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError("a parameter must wrap a tensor")
    return data


def _encode_latin1(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``, which protocol-2 pickles use for bytes; latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin-1 encoded bytes are supported")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _encode_latin1,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors and containers; everything else becomes a never-called :class:`Stub`."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        return _stub_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        # Plain pickles have no persistent ids; torch.save files do (read those with torch.load).
        raise pickle.UnpicklingError("persistent ids are not supported in a network pickle")


def restricted_load(path: str | Path) -> Any:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except FileNotFoundError:
        raise LikenessError("weights_not_found", f"no such file: {path}", status=404) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        RuntimeError,
        AttributeError,
        IndexError,
        KeyError,
        UnicodeDecodeError,
    ) as e:
        raise LikenessError("bad_checkpoint", f"cannot read {path} as a pickle: {e}") from None


def class_name(obj: Any) -> str:
    """The dotted name of what a stub stands for ("" for real Python objects)."""
    if not isinstance(obj, Stub):
        return ""
    if obj.qualname == PERSISTENT_RECONSTRUCT:
        meta = obj.args[0] if obj.args and isinstance(obj.args[0], dict) else {}
        return f"<persistent>.{meta.get('class_name', '?')}"
    if obj.qualname == "copyreg._reconstructor" and obj.args and isinstance(obj.args[0], type):
        return getattr(obj.args[0], "qualname", "?")
    return obj.qualname


def _object_state(obj: Any) -> dict | None:
    """The ``__dict__`` a stub would have restored, if it has one."""
    if not isinstance(obj, Stub):
        return None
    if obj.qualname == PERSISTENT_RECONSTRUCT:
        meta = obj.args[0] if obj.args and isinstance(obj.args[0], dict) else {}
        state = meta.get("state")
    else:
        state = obj.state
    if isinstance(state, Stub):  # an EasyDict or another dict subclass
        state = state.items
    return state if isinstance(state, dict) else None


def is_module(obj: Any) -> bool:
    state = _object_state(obj)
    return state is not None and "_parameters" in state and "_modules" in state


@dataclass
class ModuleTree:
    """A pickled ``nn.Module`` read back: tensors by dotted name, classes and attributes."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)  # module path → bare class name
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)  # plain values only


_PLAIN = (bool, int, float, str, type(None))


def module_tree(obj: Any) -> ModuleTree:
    """Walk a stubbed ``nn.Module``: parameters, persistent buffers, submodules."""
    tree = ModuleTree()

    def walk(node: Any, prefix: str) -> None:
        state = _object_state(node)
        if state is None or not is_module(node):
            raise LikenessError(
                "bad_checkpoint", f"'{prefix or '<root>'}' is not a pickled torch module"
            )
        tree.classes[prefix] = class_name(node).rsplit(".", 1)[-1]
        tree.attributes[prefix] = {
            k: v for k, v in state.items() if not k.startswith("_") and isinstance(v, _PLAIN)
        }
        dot = f"{prefix}." if prefix else ""
        skip = state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for key, value in (state.get(group) or {}).items():
                if value is None or (group == "_buffers" and key in skip):
                    continue
                if not isinstance(value, Tensor):
                    raise LikenessError("bad_checkpoint", f"{dot}{key} is not a tensor")
                tree.tensors[f"{dot}{key}"] = value
        for key, child in (state.get("_modules") or {}).items():
            if child is not None:
                walk(child, f"{dot}{key}")

    walk(obj, "")
    return tree
