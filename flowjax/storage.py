"""Workdir files on local disk or on object storage (gs://...), through one layer.

Local paths use the operating system directly; a path with a scheme (gs://bucket/run) goes
through etils.epath (gcsfs for gs://: `pip install flowjax[gcs]`), the layer orbax uses for its
own files, so a workdir on a bucket holds the same files as a local one. Object stores have no
append and no directories: `append_text` rewrites the object, `makedirs` is a no-op there, and a
"directory" exists once an object lies under it.
"""

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
