"""EDM-style network pickles read without torch (flowjax.network_pickle), on a fixture written
by torch's own pickling (tests/reference/make_edm_pickle.py)."""

import os
import pickle

import ml_dtypes
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from flowjax import convert, network_pickle

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
PICKLE = os.path.join(REFERENCE, "imm_songunet_edm.pkl")


def test_the_ema_network_is_the_state_dict_torch_would_give():
  """Names, values and dtypes equal the state dict the pickle was made from; the non-persistent
  buffer (model.resample_filter) is left out, as torch's state_dict() leaves it out."""
  state = network_pickle.state_dict(PICKLE)
  expected = safetensors_numpy.load_file(os.path.join(REFERENCE, "imm_songunet.safetensors"))
  assert sorted(state) == sorted(expected)
  for name, value in expected.items():
    assert state[name].dtype == value.dtype and np.array_equal(state[name], value), name
  assert "model.resample_filter" not in state
  assert convert.read_state_dict(PICKLE).keys() == expected.keys()


def test_strided_offset_bfloat16_integer_and_scalar_tensors():
  state = network_pickle.state_dict(PICKLE, "extras")
  base = np.arange(24, dtype=np.float32).reshape(4, 6)
  np.testing.assert_array_equal(state["transposed"], base.T)
  np.testing.assert_array_equal(state["offset"], base[1:, 2:4])
  assert state["bf16"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(state["bf16"].astype(np.float32), np.linspace(-2, 2, 5))
  assert state["steps"].dtype == np.int64 and list(state["steps"]) == [3, 1, 4]
  assert state["scalar"].shape == () and float(state["scalar"]) == 2.5


def test_network_choice_and_errors(tmp_path):
  with pytest.raises(network_pickle.PickleError, match="no network 'net'.*'ema', 'extras'"):
    network_pickle.state_dict(PICKLE, "net")
  archive = tmp_path / "archive.pkl"
  archive.write_bytes(b"PK\x03\x04" + b"\x00" * 20)
  with pytest.raises(convert.ConversionError, match="not a pickle"):
    convert.read_state_dict(str(archive))
  truncated = tmp_path / "truncated.pkl"
  truncated.write_bytes(open(PICKLE, "rb").read()[:5000])
  with pytest.raises(convert.ConversionError, match="truncated.pkl"):
    convert.read_state_dict(str(truncated))


class _Payload:
  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


def test_no_code_in_the_file_runs(tmp_path):
  """A pickle that would run a shell command when loaded the usual way loads as an inert
  stand-in: the command never runs."""
  payload = _Payload()
  payload.path = tmp_path / "ran"
  path = tmp_path / "evil.pkl"
  with open(path, "wb") as f:
    pickle.dump({"ema": payload}, f)
  loaded = network_pickle.load(str(path))
  assert not payload.path.exists()
  assert isinstance(loaded["ema"], network_pickle.Stub)
  with pytest.raises(network_pickle.PickleError, match="no torch network"):
    network_pickle.state_dict(str(path))
