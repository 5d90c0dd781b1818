"""Workdir files on local disk or on object storage (gs://...), through one layer.

Local paths use the operating system directly; a path with a scheme (gs://bucket/run) goes
through etils.epath (gcsfs for gs://: `pip install flowjax[gcs]`), the layer orbax uses for its
own files, so a workdir on a bucket holds the same files as a local one. Object stores have no
append and no directories: `append_text` rewrites the object, `makedirs` is a no-op there, and a
"directory" exists once an object lies under it.

Readers that need files on disk (tokenizers, safetensors' memory map, a model folder's several
files) take a model folder on object storage through `local_copy`: a copy on local disk,
downloaded once per host and kept while the objects keep their sizes.
"""

import functools
import hashlib
import json
import os
import shutil


def is_remote(path: str) -> bool:
  return "://" in str(path)


def _epath(path: str):
  from etils import epath
  try:
    return epath.Path(path)
  except Exception as error:  # an unknown scheme, a missing backend package
    raise OSError(f"{path}: this storage cannot be opened ({type(error).__name__}: {error}); "
                  "for gs:// install flowjax[gcs] (gcsfs).") from error


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


def _remote_listing(path: str, suffixes) -> tuple[bool, dict[str, list[int]]]:
  """(whether `path` is one object, {name: _version}): the object under its own name, or the
  objects under the folder `path` whose names end with one of `suffixes` (None: all), by
  relative name."""
  target = _epath(path)
  if target.is_file():
    return True, {str(path).rsplit("/", 1)[-1]: _version(target)}
  # walk() may give its roots without the scheme: names are taken relative to the top as text.
  top = str(target).split("://", 1)[-1].rstrip("/")
  found = {}
  for root, _, files in target.walk():
    folder = str(root).split("://", 1)[-1].rstrip("/")[len(top):].strip("/")
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


@functools.lru_cache(maxsize=64)
def _local_copy(path: str, suffixes) -> str:
  single, listing = _remote_listing(path, suffixes)
  if not listing:
    raise FileNotFoundError(
        f"{path}: there is no such object, nor objects under it"
        + (f" ending in {', '.join(suffixes)}" if suffixes else "") + "; check the path.")
  key = hashlib.sha256(f"{path}|{suffixes}".encode()).hexdigest()[:20]
  home = os.path.join(cache_root(), "objects", key)
  if not _copied(home, listing):
    temporary = f"{home}.tmp.{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    for name in sorted(listing):
      file = os.path.join(temporary, "data", name)
      os.makedirs(os.path.dirname(file), exist_ok=True)
      with open(file, "wb") as f:
        f.write(read_bytes(path if single else join(path, name)))
    with open(os.path.join(temporary, "manifest.json"), "w") as f:
      json.dump(listing, f)
    # Another process of this host may finish the same copy first: the first one in place stays.
    stale = f"{home}.old.{os.getpid()}"
    if os.path.isdir(home) and not _copied(home, listing):
      os.rename(home, stale)
    try:
      os.rename(temporary, home)
    except OSError:
      if not _copied(home, listing):
        raise
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.rmtree(stale, ignore_errors=True)
  data = os.path.join(home, "data")
  return os.path.join(data, next(iter(listing))) if single else data


def local_copy(path: str, suffixes=MODEL_FOLDER_SUFFIXES) -> str:
  """A local path to the file or folder `path`: `path` itself when it is local; for an object or
  a folder of objects (gs://...), a copy under cache_root()/objects, downloaded once per host and
  fetched again when the objects' names, sizes or modification times change. Of a folder, the files whose names end
  with one of `suffixes` (None: every file), in sub-folders too; an object keeps its own name."""
  if not is_remote(path):
    return path
  return _local_copy(str(path).rstrip("/"), None if suffixes is None else tuple(suffixes))
