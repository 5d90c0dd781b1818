"""Registries: find models, objectives and data sources by name, with "did you mean" errors."""

import difflib
from typing import Any, Callable


class Registry:
  """A name -> object table for one kind of component (e.g. "model", "objective")."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:
    def add(obj):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._entries[name] = obj
      return obj
    return add

  def get(self, name: str) -> Any:
    if name not in self._entries:
      raise KeyError(unknown_name_message(self.kind, name, sorted(self._entries)))
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
  close = difflib.get_close_matches(name, known, n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  return f"Unknown {kind} {name!r}.{hint} Known: {', '.join(known)}."


MODELS = Registry("model")
OBJECTIVES = Registry("objective")
