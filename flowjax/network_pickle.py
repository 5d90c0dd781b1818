"""EDM-style network pickles (`.pkl`, as IMM publishes its checkpoints) read without torch.

Such a file is a standard pickle of e.g. dict(ema=network, ...), where `network` is a torch
module whose classes are "persistent" (EDM's torch_utils.persistence: each pickles as
_reconstruct_persistent_obj(meta) with the source code of its module and its state) and whose
parameters pickle through torch's reducers, each storage as the bytes of a legacy torch.save.
Unpickling it the usual way needs torch and executes the source code inside the file.

This reader does neither: a restricted unpickler resolves only the few globals such a file names
(torch's tensor, parameter and storage rebuilders, the persistence hook, OrderedDict); any other
class becomes an inert stand-in that keeps its state. It walks the module tree as
torch.nn.Module.state_dict() does (parameters, then persistent buffers, then submodules) and
returns {name: NumPy array}. No code from the file runs.
"""

import collections
import io
import pickle
from typing import Any

import numpy as np

# Legacy torch.save: the magic number and protocol version that open the file.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


class PickleError(ValueError):
  """The file is not a network pickle this reader understands."""


def _storage_dtype(name: str):
  if name == "BFloat16Storage":
    import ml_dtypes
    return ml_dtypes.bfloat16
  if name not in _STORAGE_DTYPES:
    raise PickleError(f"a tensor storage of type torch.{name}, which this reader does not know.")
  return _STORAGE_DTYPES[name]


class _StorageType:
  """Stands for torch.<Type>Storage inside a legacy storage record."""

  def __init__(self, name: str):
    self.dtype = _storage_dtype(name)


class _LegacyUnpickler(pickle.Unpickler):
  """The pickle inside a legacy torch.save of one storage: its record is a persistent id."""

  def find_class(self, module, name):
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    raise PickleError(f"a storage record refers to {module}.{name}.")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise PickleError(f"an unknown persistent record {pid!r} in a storage.")
    _, storage_type, key, _location, _numel = pid[:5]
    return key, storage_type.dtype


def _load_storage(data: bytes) -> np.ndarray:
  """A 1-D array of the elements of a storage saved by torch.save in the legacy format."""
  f = io.BytesIO(data)
  if pickle.load(f) != _LEGACY_MAGIC or pickle.load(f) != _LEGACY_PROTOCOL:
    raise PickleError("a tensor storage is not in torch's legacy save format.")
  system = pickle.load(f)
  if not system.get("little_endian", True):
    raise PickleError("a tensor storage was saved on a big-endian machine.")
  key, dtype = _LegacyUnpickler(f).load()
  keys = pickle.load(f)
  if keys != [key]:
    raise PickleError(f"a storage record holds the storages {keys}, not one.")
  count = int.from_bytes(f.read(8), "little")
  itemsize = np.dtype(dtype).itemsize
  raw = f.read(count * itemsize)
  if len(raw) != count * itemsize:
    raise PickleError("a tensor storage is truncated.")
  return np.frombuffer(raw, dtype=dtype)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2: a strided view of a storage, copied."""
  del unused
  if not size:
    return np.array(storage[offset])
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  """torch._utils._rebuild_parameter(_with_state): the parameter's data."""
  del unused
  return data


class Persistent:
  """A persistent EDM object: its class name and state (the module's __dict__)."""

  def __init__(self, meta):
    if not isinstance(meta, dict) or meta.get("type") != "class":
      raise PickleError("a persistent object without class metadata.")
    self.class_name = meta.get("class_name", "?")
    self.state = dict(meta.get("state") or {})


class Stub(dict):
  """Any other class (torch.nn containers, dnnlib.EasyDict, ...): keeps its state, runs
  nothing. Dict items set by the pickle stay available as items; constructor arguments are
  ignored (a call the pickle asks for is never made)."""

  def __init__(self, *args, **kwargs):
    del args, kwargs
    super().__init__()

  def __setstate__(self, state):
    self.__dict__["state"] = state if isinstance(state, dict) else {"state": state}


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): Persistent,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
# Rebuilding calls that only copyreg and builtins make on the way (never user code).
_SAFE = {("copyreg", "_reconstructor"), ("builtins", "object"), ("builtins", "set"),
         ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "dict"),
         ("builtins", "list"), ("builtins", "tuple")}


class _NetworkUnpickler(pickle.Unpickler):

  def __init__(self, f):
    super().__init__(f)
    self._stubs = {}

  def find_class(self, module, name):
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if (module, name) in _SAFE:
      return super().find_class(module, name)
    if module.startswith("torch") and not module.startswith("torch.nn"):
      raise PickleError(f"the file uses {module}.{name}, which this reader does not rebuild.")
    key = (module, name)
    if key not in self._stubs:
      self._stubs[key] = type(name, (Stub,), {"__module__": f"stub.{module}"})
    return self._stubs[key]

  def persistent_load(self, pid):
    raise PickleError("the file is a torch.save archive, not a network pickle; convert it as "
                      "a .pt file.")


def _module_state(obj) -> dict | None:
  """The __dict__ of a pickled torch module, or None if `obj` is not one."""
  if isinstance(obj, Persistent):
    state = obj.state
  elif isinstance(obj, Stub):
    state = obj.__dict__.get("state", {})
  else:
    return None
  return state if "_parameters" in state or "_modules" in state else None


def _state_dict(obj, prefix: str, out: dict) -> None:
  state = _module_state(obj)
  for name, value in (state.get("_parameters") or {}).items():
    if value is not None:
      out[prefix + name] = value
  skip = set(state.get("_non_persistent_buffers_set") or ())
  for name, value in (state.get("_buffers") or {}).items():
    if value is not None and name not in skip:
      out[prefix + name] = value
  for name, child in (state.get("_modules") or {}).items():
    if child is not None and _module_state(child) is not None:
      _state_dict(child, f"{prefix}{name}.", out)


def load(path: str) -> Any:
  """The unpickled top-level object of a network pickle (modules as Persistent or Stub)."""
  with open(path, "rb") as f:
    head = f.read(2)
    f.seek(0)
    if head[:1] != b"\x80":
      raise PickleError(f"{path} is not a pickle (a zip archive is a torch.save checkpoint: "
                        "convert it as .pt).")
    return _NetworkUnpickler(f).load()


def state_dict(path: str, key: str = "") -> dict[str, np.ndarray]:
  """{name: NumPy array} of the network under `key` ("" = 'ema', else the only network) of an
  EDM-style network pickle, as torch's state_dict() names them."""
  data = load(path)
  if _module_state(data) is not None:
    network = data
  else:
    if not isinstance(data, dict):
      raise PickleError(f"{path} holds a {type(data).__name__}, not a dict of networks.")
    networks = {name: value for name, value in data.items() if _module_state(value) is not None}
    if not networks:
      raise PickleError(f"{path} holds no torch network (its entries: {sorted(map(str, data))}).")
    if key:
      if key not in networks:
        raise PickleError(f"{path} has no network {key!r}; it has {sorted(networks)}.")
      network = networks[key]
    elif "ema" in networks:
      network = networks["ema"]
    elif len(networks) == 1:
      network = next(iter(networks.values()))
    else:
      raise PickleError(f"{path} holds the networks {sorted(networks)}; pick one with --key.")
  out = {}
  _state_dict(network, "", out)
  if not out:
    raise PickleError(f"{path}: the network has no parameters.")
  return out
