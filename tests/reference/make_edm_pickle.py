"""Writes tests/reference/imm_songunet_edm.pkl: the imm_songunet fixture's weights as an EDM-style
network pickle, the format IMM publishes its checkpoints in (needs torch; run once by hand:
python tests/reference/make_edm_pickle.py). flowjax reads it without torch (flowjax.convert).

The pickle holds dict(ema=network, loss_fn=None, augment_pipe=None, dataset_kwargs=EasyDict),
pickled with the standard pickle module as EDM's training loop does. Network modules whose class
is persistent pickle as torch_utils.persistence._reconstruct_persistent_obj(meta) with meta =
dict(type='class', version, module_src, class_name, state) and the module's __dict__ as the
state; containers are plain torch.nn.ModuleDict; parameters and buffers pickle through torch's
own reducers (legacy-format storage bytes). The tree follows the state dict's names, with one
non-persistent buffer that a state dict leaves out.
"""

import collections
import os
import pickle
import sys
import types

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = 6


def _install_modules():
  """Importable stand-ins for torch_utils.persistence and dnnlib.util, which pickle refers to."""
  persistence = types.ModuleType("torch_utils.persistence")
  package = types.ModuleType("torch_utils")
  package.persistence = persistence
  util = types.ModuleType("dnnlib.util")
  dnnlib = types.ModuleType("dnnlib")
  dnnlib.util = util

  class EasyDict(dict):
    def __getattr__(self, name):
      return self[name]

  EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
  util.EasyDict = EasyDict

  def _reconstruct_persistent_obj(meta):
    raise RuntimeError("only flowjax's reader loads this fixture")

  _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
  _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
  persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
  sys.modules.update({"torch_utils": package, "torch_utils.persistence": persistence,
                      "dnnlib": dnnlib, "dnnlib.util": util})
  return persistence, EasyDict


PERSISTENCE, EASY_DICT = _install_modules()


class Persistent(torch.nn.Module):
  """A module that pickles as EDM's persistent classes do (source code and state in meta)."""

  def __init__(self, class_name, **init_kwargs):
    super().__init__()
    self._orig_class_name = class_name
    self._init_args = ()
    self._init_kwargs = dict(init_kwargs)

  def __reduce__(self):
    fields = list(super().__reduce__())
    fields += [None] * max(3 - len(fields), 0)
    state = dict(fields[2])
    class_name = state.pop("_orig_class_name")
    meta = dict(type="class", version=VERSION,
                module_src=f"# source of the module defining {class_name}\n",
                class_name=class_name, state=state)
    return (PERSISTENCE._reconstruct_persistent_obj, (meta,), None)


CLASS_NAMES = {"": "IMMPrecond", "model": "SongUNet"}


def build(state_dict):
  root = Persistent("IMMPrecond", img_resolution=16, img_channels=3, label_dim=10)
  for name, value in state_dict.items():
    *path, leaf = name.split(".")
    module = root
    for depth, part in enumerate(path):
      if part not in module._modules:
        prefix = ".".join(path[:depth + 1])
        if part in ("enc", "dec"):
          child = torch.nn.ModuleDict()
        else:
          child = Persistent(CLASS_NAMES.get(prefix, "Layer"))
        module.add_module(part, child)
      module = module._modules[part]
    module.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
  # A buffer that state_dict() leaves out, as EDM's resample filters are.
  root.model.register_buffer("resample_filter", torch.ones(2, 2), persistent=False)
  return root


def main():
  state_dict = load_file(os.path.join(HERE, "imm_songunet.safetensors"))
  network = build(collections.OrderedDict(sorted(state_dict.items())))
  assert set(network.state_dict()) == set(state_dict)
  # Layouts a state dict can hold beyond contiguous float32: a transposed (strided) view, an
  # offset into a larger storage, bfloat16, int64 and 0-d tensors.
  extras = Persistent("Extras")
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  extras.register_parameter("transposed", torch.nn.Parameter(base.t(), requires_grad=False))
  extras.register_parameter("offset", torch.nn.Parameter(base[1:, 2:4], requires_grad=False))
  extras.register_buffer("bf16", torch.linspace(-2, 2, 5).to(torch.bfloat16))
  extras.register_buffer("steps", torch.tensor([3, 1, 4], dtype=torch.int64))
  extras.register_buffer("scalar", torch.tensor(2.5))
  data = dict(ema=network, extras=extras, loss_fn=None, augment_pipe=None,
              dataset_kwargs=EASY_DICT(resolution=16, max_size=None))
  with open(os.path.join(HERE, "imm_songunet_edm.pkl"), "wb") as f:
    pickle.dump(data, f)


if __name__ == "__main__":
  main()
