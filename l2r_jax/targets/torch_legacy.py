"""Reads a legacy (pre-1.6, non-zip) `torch.save` file with pickle and NumPy, without torch.

The legacy format is a stream of five parts, all little-endian:

  1. pickle: the magic number 0x1950a86a20f9469cfc6c
  2. pickle: the protocol version 1001
  3. pickle: sys_info (a dict: little_endian, type_sizes)
  4. pickle: the saved object; each tensor is a call `torch._utils._rebuild_tensor_v2(storage,
     storage_offset, size, stride, ...)` whose storage is a persistent id
     ('storage', StorageClass, key, location, numel[, view_metadata])
  5. pickle: the list of storage keys, then for each key in that order an int64 element count
     followed by the storage's raw bytes.

The tensors are rebuilt only after part 5 is read, because the pickle of part 4 refers to storages
whose bytes come later. Only the globals a state dict needs are resolved (an allowlist), so loading
a file never runs arbitrary code.
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
PROTOCOL_VERSION = 1001

# torch storage class name -> NumPy dtype (little-endian, as the legacy writer stored it).
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _Storage:
  """A storage named by the pickle, filled once its raw bytes are read."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.data: np.ndarray | None = None


class _StorageView:
  """An old-style view into a root storage (view_metadata in the persistent id)."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root, self.offset, self.numel = root, offset, numel


class _TensorRef:
  """A tensor to rebuild from its storage once the bytes are known."""

  def __init__(self, storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _StorageType:
  """Stands for `torch.FloatStorage` etc. in persistent ids."""

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  return data  # a Parameter is its tensor for our purposes


class _Unpickler(pickle.Unpickler):
  """Resolves torch's rebuild functions and storage classes to the stand-ins above, and nothing
  outside the allowlist."""

  def __init__(self, file, path: str, storages: dict[str, _Storage]):
    super().__init__(file, encoding="utf-8")
    self.path, self.storages = path, storages

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    raise ValueError(f"{self.path}: the torch file refers to {module}.{name}, which this reader "
                     f"does not support (it reads state dicts of tensors only)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
      raise ValueError(f"{self.path}: unexpected persistent id {pid!r} (expected a legacy "
                       f"('storage', type, key, location, numel, view) tuple)")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if not isinstance(storage_type, _StorageType):
      raise ValueError(f"{self.path}: storage {key} has unsupported type {storage_type!r}")
    if key not in self.storages:
      self.storages[key] = _Storage(key, storage_type.dtype, numel)
    root = self.storages[key]
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return root
    _, view_offset, view_numel = view
    return _StorageView(root, int(view_offset), int(view_numel))


def _load_pickle(f, path: str, what: str, storages: dict[str, _Storage] | None = None) -> Any:
  try:
    return _Unpickler(f, path, {} if storages is None else storages).load()
  except ValueError:
    raise
  except Exception as e:  # a truncated or foreign file: say which part broke
    raise ValueError(f"{path}: could not read the {what} of a legacy torch file "
                     f"({type(e).__name__}: {e})") from e


def _read_storage(f, path: str, storage: _Storage) -> np.ndarray:
  header = f.read(8)
  if len(header) != 8:
    raise ValueError(f"{path}: file ends before storage {storage.key} (truncated?)")
  numel = int(np.frombuffer(header, "<i8")[0])
  if numel != storage.numel:
    raise ValueError(f"{path}: storage {storage.key} has {numel} elements in the data section, "
                     f"but the pickle says {storage.numel}")
  nbytes = numel * storage.dtype.itemsize
  raw = f.read(nbytes)
  if len(raw) != nbytes:
    raise ValueError(f"{path}: storage {storage.key} is truncated ({len(raw)} of {nbytes} bytes)")
  return np.frombuffer(raw, storage.dtype).copy()


def _tensor(ref: _TensorRef, path: str) -> np.ndarray:
  storage, base = ref.storage, 0
  if isinstance(storage, _StorageView):
    storage, base = storage.root, storage.offset
  data = storage.data
  if data is None:
    raise ValueError(f"{path}: storage {storage.key} is used by a tensor but has no data")
  if len(ref.size) != len(ref.stride):
    raise ValueError(f"{path}: tensor size {ref.size} and stride {ref.stride} differ in rank")
  if any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride):
    raise ValueError(f"{path}: negative size or stride ({ref.size}, {ref.stride})")
  offset = base + ref.offset
  # The last element the view touches must lie inside the storage.
  last = offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride)) if all(ref.size) else -1
  if offset < 0 or last >= data.size or (all(ref.size) and offset >= data.size):
    raise ValueError(f"{path}: tensor (offset {offset}, size {ref.size}, stride {ref.stride}) "
                     f"reaches outside its storage of {data.size} elements")
  if not all(ref.size):
    return np.zeros(ref.size, data.dtype)
  itemsize = data.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      data[offset:], shape=ref.size, strides=tuple(s * itemsize for s in ref.stride))
  return np.array(view)  # own the memory: no aliasing between tensors of one storage


def _resolve(obj: Any, path: str) -> Any:
  if isinstance(obj, _TensorRef):
    return _tensor(obj, path)
  if isinstance(obj, (_Storage, _StorageView)):
    raise ValueError(f"{path}: the file holds a bare storage, not a tensor")
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, path)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, path) for v in obj)
  return obj


def load(path: str) -> Any:
  """The object saved by a legacy `torch.save` with every tensor as a NumPy array.

  Raises:
    ValueError for a zip-format (torch >= 1.6) file, a foreign or truncated file, or globals
    other than those of a state dict (OrderedDict, tensors, parameters, storages).
  """
  with open(path, "rb") as f:
    head = f.read(4)
    f.seek(0)
    if zipfile.is_zipfile(f) or head.startswith(b"PK"):
      raise ValueError(f"{path} is a zip-format torch file (torch >= 1.6); this reader supports "
                       f"the legacy format only: re-save it with "
                       f"torch.save(obj, path, _use_new_zipfile_serialization=False)")
    f.seek(0)
    magic = _load_pickle(f, path, "magic number")
    if magic != MAGIC_NUMBER:
      raise ValueError(f"{path} is not a legacy torch file (magic number {magic!r})")
    protocol = _load_pickle(f, path, "protocol version")
    if protocol != PROTOCOL_VERSION:
      raise ValueError(f"{path}: unsupported torch protocol version {protocol!r} "
                       f"(expected {PROTOCOL_VERSION})")
    sys_info = _load_pickle(f, path, "sys_info")
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
      raise ValueError(f"{path}: only little-endian legacy torch files are supported "
                       f"(sys_info {sys_info!r})")
    storages: dict[str, _Storage] = {}
    obj = _load_pickle(f, path, "saved object", storages)
    keys = _load_pickle(f, path, "storage keys")
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
      raise ValueError(f"{path}: the storage key list {keys!r} does not match the storages "
                       f"the object uses ({sorted(storages)})")
    for key in keys:
      storages[str(key)].data = _read_storage(f, path, storages[str(key)])
    if f.read(1):
      raise ValueError(f"{path}: unexpected bytes after the last storage")
  return _resolve(obj, path)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a legacy torch state dict file (see `load`).

  Raises:
    ValueError if the file does not hold a flat mapping of names to tensors.
  """
  obj = load(path)
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  bad = [str(k) for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"{path}: state dict entries that are not tensors: {bad[:10]}")
  return {str(k): v for k, v in obj.items()}

