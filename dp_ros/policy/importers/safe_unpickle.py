"""Read a ``torch.save`` archive (e.g. the reference code's ``.ckpt``) without running its code.

A pickle can call any importable function while it loads. This reader never calls
``torch.load`` (nor ``pickle.load`` on untrusted classes): it opens the zip archive that
``torch.save`` writes, and unpickles ``data.pkl`` with an unpickler whose ``find_class``
knows a short allow-list:

- tensors: the storage type markers (``torch.FloatStorage``, ...) and
  ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``, replaced by functions of this
  module that build a tensor from the raw bytes of ``<archive>/data/<key>``;
- plain containers: ``collections.OrderedDict`` (and ``defaultdict``, built as a plain dict),
  the builtin containers, and dill's ``_load_type`` for builtin type names only;
- OmegaConf's config classes (``DictConfig``, ``ListConfig``, value nodes, metadata) and a
  few ``typing`` markers: these become inert stand-ins that only record their pickled state;
  ``to_plain`` turns them into dicts, lists and scalars. omegaconf is never imported.

Any other global is refused with a ``PickleRefused`` naming it. Nothing in the archive is
executed, and a malformed archive raises instead of reading out of bounds.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch


class PickleRefused(ValueError):
    """The archive needs something the restricted unpickler does not build."""


# -- tensors ------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _StorageType:
    """Stand-in for ``torch.<X>Storage`` in a persistent id: only carries the dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """The bytes of one storage record, viewed as a flat tensor of its dtype."""

    def __init__(self, data: bytes, dtype: torch.dtype, numel: int, where: str):
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(data) != numel * itemsize:
            raise PickleRefused(f"{where}: storage holds {len(data)} bytes, expected {numel} x {itemsize}")
        self.numel = numel
        self.flat = torch.frombuffer(bytearray(data), dtype=dtype) if numel else torch.empty(0, dtype=dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise PickleRefused("a tensor refers to something that is not a storage record")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise PickleRefused(f"malformed tensor size {size} / stride {stride}")
    offset = int(storage_offset)
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if offset < 0 or last >= storage.numel:
            raise PickleRefused(f"tensor of size {size} reaches past its storage of {storage.numel} elements")
        return torch.as_strided(storage.flat, size, stride, offset)
    return torch.empty(size, dtype=storage.flat.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise PickleRefused("a parameter wraps something that is not a tensor")
    return data


_TENSOR_TYPES = {("torch", "Tensor"), ("torch.nn.parameter", "Parameter")}


def _rebuild_from_type(func, new_type, args, state=None) -> torch.Tensor:
    # torch._tensor._rebuild_from_type_v2: a tensor (sub)class around one of the rebuilds above
    if func not in (_rebuild_tensor, _rebuild_parameter) or not (
            isinstance(new_type, _TypeMarker) and new_type.name in {".".join(t) for t in _TENSOR_TYPES}):
        raise PickleRefused("refusing a tensor of a class other than Tensor/Parameter")
    return func(*args)


# -- OmegaConf stand-ins ----------------------------------------------------------------------

class _StandIn:
    """Inert replacement for a pickled class: records the state pickle hands it."""

    kind = "object"
    qualname = ""

    def __new__(cls, *args, **kwargs):  # NEWOBJ calls only __new__; BUILD then sets the state
        obj = super().__new__(cls)
        obj.state = {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if not isinstance(state, dict):
            raise PickleRefused(f"{self.qualname}: unexpected pickled state {type(state).__name__}")
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname} stand-in>"


def _standin(qualname: str, kind: str) -> type:
    return type(qualname.rsplit(".", 1)[-1] + "StandIn", (_StandIn,), {"kind": kind, "qualname": qualname})


_OMEGACONF = {
    ("omegaconf.dictconfig", "DictConfig"): "dict",
    ("omegaconf.listconfig", "ListConfig"): "list",
    ("omegaconf.nodes", "AnyNode"): "value",
    ("omegaconf.nodes", "StringNode"): "value",
    ("omegaconf.nodes", "IntegerNode"): "value",
    ("omegaconf.nodes", "FloatNode"): "value",
    ("omegaconf.nodes", "BooleanNode"): "value",
    ("omegaconf.nodes", "BytesNode"): "value",
    ("omegaconf.base", "Metadata"): "metadata",
    ("omegaconf.base", "ContainerMetadata"): "metadata",
}
_STANDINS = {key: _standin(".".join(key), kind) for key, kind in _OMEGACONF.items()}


class _TypeMarker:
    """A type object referenced by config metadata (typing.Any, dict, ...): never called."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<type {self.name}>"


_BUILTIN_TYPES = {"dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset,
                  "int": int, "float": float, "str": str, "bool": bool, "bytes": bytes,
                  "NoneType": type(None), "complex": complex}
_TYPING = {"Any", "Dict", "List", "Tuple", "Optional", "Union"}


def _dill_load_type(name):
    if name in _BUILTIN_TYPES:
        return _BUILTIN_TYPES[name]
    raise PickleRefused(f"refusing dill type {name!r}: only builtin container and scalar types are built")


def _plain_defaultdict(factory=None, *rest):
    # the factory (from _load_type/builtins) is discarded: a plain dict is all a reader needs
    return {}


def _reconstructor(cls, base, state=None):
    # copyreg._reconstructor (pickle protocols 0/1) restricted to the stand-ins
    if isinstance(cls, type) and issubclass(cls, _StandIn) and base is object:
        return cls.__new__(cls)
    raise PickleRefused("refusing copyreg._reconstructor for a class that is not a config stand-in")


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # pickle protocol 2 stores bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise PickleRefused("refusing _codecs.encode other than the protocol-2 bytes encoding")
    return text.encode("latin1")


def _safe_set(items=()):
    return set(items)


def _safe_frozenset(items=()):
    return frozenset(items)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix
        self.source = source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _STANDINS:
            return _STANDINS[key]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if key in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if key in (("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state")):
            return _rebuild_parameter
        if key == ("torch._tensor", "_rebuild_from_type_v2"):
            return _rebuild_from_type
        if key in _TENSOR_TYPES:
            return _TypeMarker(".".join(key))
        if key == ("collections", "OrderedDict"):
            return OrderedDict
        if key == ("collections", "defaultdict"):
            return _plain_defaultdict
        if key == ("dill._dill", "_load_type"):
            return _dill_load_type
        if key == ("_codecs", "encode"):
            return _codecs_encode
        if key == ("copyreg", "_reconstructor"):
            return _reconstructor
        if module == "typing" and name in _TYPING:
            return _TypeMarker(f"typing.{name}")
        if module in ("builtins", "__builtin__"):
            if name == "set":
                return _safe_set
            if name == "frozenset":
                return _safe_frozenset
            if name in ("object",):
                return _TypeMarker(name)
            if name in _BUILTIN_TYPES:
                return _BUILTIN_TYPES[name]
        raise PickleRefused(
            f"{self.source}: refusing to load '{module}.{name}': the restricted unpickler builds only "
            f"tensors, plain containers and OmegaConf configs as data")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PickleRefused(f"{self.source}: unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise PickleRefused(f"{self.source}: storage record {key!r} has no known storage type")
        key = str(key)
        if key not in self.storages:
            record = f"{self.prefix}data/{key}"
            try:
                data = self.archive.read(record)
            except KeyError:
                raise PickleRefused(f"{self.source}: archive has no storage record {record!r}") from None
            self.storages[key] = _Storage(data, storage_type.dtype, int(numel), f"{self.source}:{record}")
        storage = self.storages[key]
        if storage.flat.dtype != storage_type.dtype:
            raise PickleRefused(f"{self.source}: storage {key!r} is read with two dtypes")
        return storage


def load_torch_archive(path: str | Path) -> Any:
    """Unpickle the ``data.pkl`` of a ``torch.save`` zip archive with the restricted unpickler.

    Returns plain Python data: dicts, lists, scalars, tensors, and config stand-ins (see
    ``to_plain``). Raises ``PickleRefused`` for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise PickleRefused(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        hint = ("a legacy (pre-zip, torch < 1.6) torch.save file" if head[:1] == b"\x80"
                else "not a torch.save zip archive")
        raise PickleRefused(f"{path}: {hint}; re-save it with torch >= 1.6 (torch.save default format)")
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise PickleRefused(f"{path}: expected one '<name>/data.pkl' record, found {len(pkls)}")
        prefix = pkls[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in archive.namelist():
            byteorder = archive.read(order).decode("ascii", "replace").strip()
            if byteorder != "little":
                raise PickleRefused(f"{path}: byte order {byteorder!r} is not supported")
        data = archive.read(pkls[0])
        try:
            return _RestrictedUnpickler(io.BytesIO(data), archive, prefix, str(path)).load()
        except PickleRefused:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError,
                ValueError, RuntimeError, KeyError) as exc:
            raise PickleRefused(f"{path}: malformed pickle ({type(exc).__name__}: {exc})") from None


_MISSING = "???"


def to_plain(obj: Any) -> Any:
    """Turn config stand-ins into dicts/lists/scalars (recursively); tensors pass through.

    OmegaConf's "missing" marker stays the string '???' and interpolations stay strings
    ('${...}'): resolving them is the reader's job.
    """
    if isinstance(obj, _StandIn):
        content = obj.state.get("_content", obj.state.get("_val"))
        if obj.kind == "value":
            return to_plain(obj.state.get("_val"))
        if obj.kind == "metadata":
            return None
        if content is None or isinstance(content, str):
            return content  # a None container, '???' or a whole-node interpolation
        if obj.kind == "dict":
            if not isinstance(content, dict):
                raise PickleRefused(f"DictConfig content is a {type(content).__name__}")
            return {k: to_plain(v) for k, v in content.items()}
        if not isinstance(content, (list, tuple)):
            raise PickleRefused(f"ListConfig content is a {type(content).__name__}")
        return [to_plain(v) for v in content]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, _TypeMarker):
        return obj.name
    return obj
