"""Workdir files on local disk or on object storage (gs://...), through one layer.

Local paths use the operating system directly; a path with a scheme (gs://bucket/run) goes
through etils.epath (gcsfs for gs://: `pip install flowjax[gcs]`), the layer orbax uses for its
own files, so a workdir on a bucket holds the same files as a local one. Object stores have no
append and no directories: `append_text` rewrites the object, `makedirs` is a no-op there, and a
"directory" exists once an object lies under it.

Readers that need files on disk (tokenizers, safetensors' memory map, a model folder's several
files) take a model folder on object storage through `local_copy`: a copy on local disk, made
once per host and made again when an object changes.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile

from absl import logging


def is_remote(path: str) -> bool:
  return "://" in str(path)


def _epath(path: str):
  from etils import epath
  try:
    return epath.Path(path)
  except Exception as error:  # an unknown scheme, a missing backend package
    raise OSError(f"{path}: this storage cannot be opened ({type(error).__name__}: {error}); "
                  "for gs:// install flowjax[gcs] (gcsfs).") from error


def check_local_output(path: str, flag: str, reads_as: str) -> None:
  """Refuses an output directory on object storage for a writer of local files (a dataset's
  shards): one ValueError naming the local-then-copy route, instead of a local folder named
  'gs:'."""
  if is_remote(path):
    raise ValueError(
        f"{flag}={path}: this command writes to local disk. Write to a local directory and copy "
        f"it to the bucket (gcloud storage rsync -r DIR {path}); training reads it there as "
        f"data.name={reads_as}{path}.")


def absolute(path: str) -> str:
  """An absolute local path, or the URL unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def join(path: str, *names: str) -> str:
  if is_remote(path):
    return "/".join([str(path).rstrip("/"), *names])
  return os.path.join(path, *names)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isfile(path: str) -> bool:
  """A file on disk, or an object on object storage."""
  return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names under a directory ([] if there is none)."""
  if is_remote(path):
    target = _epath(path)
    return sorted(child.name for child in target.iterdir()) if target.exists() else []
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    return _epath(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_head(path: str, size: int) -> bytes:
  """The first `size` bytes of a file or object (one ranged read, not the whole object)."""
  if is_remote(path):
    with _epath(path).open("rb") as f:
      return f.read(size)
  with open(path, "rb") as f:
    return f.read(size)


def getsize(path: str) -> int:
  return int(_epath(path).stat().length) if is_remote(path) else os.path.getsize(path)


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
  """Writes the whole file: an object upload, or a local temporary file renamed over `path`
  (a reader never sees half a file)."""
  if is_remote(path):
    _epath(path).write_bytes(data)
    return
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  temporary = f"{path}.tmp.{os.getpid()}"
  with open(temporary, "wb") as f:
    f.write(data)
  os.replace(temporary, path)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def append_text(path: str, text: str) -> None:
  """Appends to a local file; rewrites the object with `text` added on object storage."""
  if is_remote(path):
    old = read_bytes(path) if exists(path) else b""
    write_bytes(path, old + text.encode("utf-8"))
    return
  with open(path, "a") as f:
    f.write(text)


def remove(path: str) -> None:
  if is_remote(path):
    _epath(path).unlink(missing_ok=True)
  elif os.path.exists(path):
    os.remove(path)


def rmtree(path: str) -> None:
  """Deletes a directory and everything under it (every object under the prefix)."""
  if is_remote(path):
    target = _epath(path)
    if target.exists():
      target.rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def rename(source: str, target: str) -> None:
  """Moves a file or a directory (on object storage: every object under it)."""
  if is_remote(source):
    _epath(source).rename(target)
  else:
    shutil.move(source, target)


# What `local_copy` takes from a model folder: configs, tokenizers and weights in the formats
# flowjax reads from folders (a HuggingFace folder's other checkpoint formats, pytorch_model.bin,
# flax or TF weights, are left behind).
MODEL_FOLDER_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".npz")


def cache_root() -> str:
  """$XDG_CACHE_HOME/flowjax (~/.cache/flowjax when unset)."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "flowjax")


def _version(target) -> list[int]:
  """[size, modification time] of an object: what tells a changed object (a fine-tuned network
  of the same architecture has the same size) from the one copied."""
  info = target.stat()
  return [int(info.length), int(info.mtime or 0)]


def _remote_listing(path: str, suffixes, folders) -> tuple[bool, dict[str, list[int]]]:
  """(whether `path` is one object, {name: _version}): the object under its own name, or the
  objects under the folder `path` whose names end with one of `suffixes` (None: all) and, when
  `folders` is given, that lie in one of those sub-folders, by relative name."""
  target = _epath(path)
  if target.is_file():
    return True, {str(path).rsplit("/", 1)[-1]: _version(target)}
  # walk() may give its roots without the scheme: names are taken relative to the top as text.
  top = str(target).split("://", 1)[-1].rstrip("/")
  found = {}
  for root, _, files in target.walk():
    folder = str(root).split("://", 1)[-1].rstrip("/")[len(top):].strip("/")
    if folders is not None and folder.split("/")[0] not in folders:
      continue
    for name in files:
      relative = f"{folder}/{name}" if folder else name
      if suffixes is None or name.endswith(suffixes):
        found[relative] = _version(_epath(join(str(path), relative)))
  return False, found


def _copied(home: str, listing: dict[str, list[int]]) -> bool:
  """Whether `home` holds a finished copy of exactly the objects of `listing`."""
  try:
    with open(os.path.join(home, "manifest.json")) as f:
      recorded = json.load(f)
  except (OSError, ValueError):
    return False
  files = {name: os.path.join(home, "data", name) for name in listing}
  return recorded == listing and all(
      os.path.isfile(file) and os.path.getsize(file) == listing[name][0]
      for name, file in files.items())


def _download(path: str, single: bool, listing, home: str) -> None:
  """Copies the objects of `listing` into a new folder and puts it in place of `home`; the
  caller holds home's lock. Left-overs of killed copies of this key are removed first."""
  parent, key = os.path.split(home)
  for name in os.listdir(parent):
    if name.startswith((key + ".tmp.", key + ".old.")):
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
  temporary = tempfile.mkdtemp(dir=parent, prefix=key + ".tmp.")
  total = sum(size for size, _ in listing.values())
  logging.info("Copying %s (%d files, %.1f MB) to %s.", path, len(listing), total / 1e6, home)
  for name in sorted(listing):
    file = os.path.join(temporary, "data", name)
    os.makedirs(os.path.dirname(file), exist_ok=True)
    with _epath(path if single else join(path, name)).open("rb") as source, \
        open(file, "wb") as target:
      shutil.copyfileobj(source, target, 64 << 20)
  with open(os.path.join(temporary, "manifest.json"), "w") as f:
    json.dump(listing, f)
  stale = None
  if os.path.isdir(home):
    stale = tempfile.mkdtemp(dir=parent, prefix=key + ".old.")
    os.rename(home, os.path.join(stale, "copy"))
  os.rename(temporary, home)
  if stale:
    shutil.rmtree(stale, ignore_errors=True)


_COPIES: dict = {}  # (path, suffixes, folders) -> the local path, in this process


def local_copy(path: str, suffixes=MODEL_FOLDER_SUFFIXES, folders=None) -> str:
  """A local path to the file or folder `path`: `path` itself when it is local; for an object or
  a folder of objects (gs://...), a copy under cache_root()/objects/<hash of the arguments>,
  made by one process of a host while the others wait for it (a file lock), and made again when
  the objects' names, sizes or modification times change (checked on a process's first call).
  Of a folder, the files whose names end with one of `suffixes` (None: every file), in
  sub-folders too, or only in the sub-folders named in `folders`; an object keeps its name."""
  if not is_remote(path):
    return path
  path = str(path).rstrip("/")
  suffixes = None if suffixes is None else tuple(suffixes)
  folders = None if folders is None else tuple(folders)
  known = _COPIES.get((path, suffixes, folders))
  if known is not None and os.path.exists(known):
    return known
  single, listing = _remote_listing(path, suffixes, folders)
  if not listing:
    raise FileNotFoundError(
        f"{path}: there is no such object, nor objects under it"
        + (f" ending in {', '.join(suffixes)}" if suffixes else "") + "; check the path.")
  key = hashlib.sha256(f"{path}|{suffixes}|{folders}".encode()).hexdigest()[:20]
  home = os.path.join(cache_root(), "objects", key)
  if not _copied(home, listing):
    try:
      os.makedirs(os.path.dirname(home), exist_ok=True)
      lock = open(home + ".lock", "w")
    except OSError as error:
      raise OSError(f"{path}: its local copy cannot be made in {os.path.dirname(home)} "
                    f"({error}); set XDG_CACHE_HOME to a writable local directory.") from error
    with lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
      if not _copied(home, listing):  # another process may have made it meanwhile
        _download(path, single, listing, home)
  data = os.path.join(home, "data")
  found = os.path.join(data, next(iter(listing))) if single else data
  _COPIES[(path, suffixes, folders)] = found
  return found


@contextlib.contextmanager
def naming(local: str, remote: str):
  """Errors raised inside the block name `remote` where they would name its local copy `local`
  (a loader reading a model folder from object storage through `local_copy`)."""
  try:
    yield
  except (OSError, ValueError) as error:
    if local == remote or local not in str(error):
      raise
    try:
      renamed = type(error)(str(error).replace(local, remote))
    except Exception:  # an error type with another constructor keeps its own message
      raise error from None
    raise renamed from error


def local_weights(path: str, config, config_name: str = "config.json"):
  """(local path, config) of a network's weights `path` and its `config` (None: the
  `config_name` beside the weights; a path; or a config object) for a loader that reads local
  files: object-storage paths through `local_copy`. A weights file brings the config beside it
  when `config` is None, and a HF index (*.index.json) the folder of its shards."""
  if isinstance(config, str) and is_remote(config):
    config = local_copy(config)
  if not is_remote(path):
    return path, config
  if not isfile(path):
    return local_copy(path), config
  folder, name = str(path).rsplit("/", 1)
  if name.endswith(".index.json"):
    return os.path.join(local_copy(folder), name), config
  if config is None and isfile(join(folder, config_name)):
    config = local_copy(join(folder, config_name))
  return local_copy(path), config


def naming_copy(local: str, path: str):
  """`naming` for `local`, the local copy of `path` that `local_copy` or `local_weights` gave: a
  file's error names the object's folder, a folder's the folder (nothing to do for local
  paths)."""
  if not is_remote(path):
    return contextlib.nullcontext()
  path = str(path).rstrip("/")
  if os.path.isfile(local):
    return naming(os.path.dirname(local), path.rsplit("/", 1)[0])
  return naming(local, path)
