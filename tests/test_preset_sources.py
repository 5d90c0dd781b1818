"""Every row of BUILD.md's "Paper presets and their sources" tables holds for its preset."""

import ast
import math
import os
import re

import pytest

from flowjax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Paper presets and their sources"
# The experiments that name a paper: each has a table.
PAPER_PRESETS = ("imm_cifar10", "imm_imagenet", "meanflow_cifar10", "meanflow_imagenet",
                 "shortcut_imagenet", "ctm_cifar10", "consistency_cifar10",
                 "tarflow_imagenet64", "starflow_imagenet", "starflow_t2i_3b", "scm_cifar10",
                 "scm_imagenet64",
                 "tvm_imagenet", "imf_imagenet", "dmd2_imagenet64", "fdistill_imagenet64",
                 "fm_cifar10", "dmd2_cifar10", "fdistill_cifar10", "fm_imagenet64")
HEADING = re.compile(r"^### `experiments/(\w+)\.py(?::(\w+))?`\s*$")
ROW = re.compile(r"^\| `([\w.]+)` \| `([^`]*)` \| ([^|]*) \|([^|]*)\|\s*$")


def parse(text: str) -> dict:
  """{(experiment, preset or None): [(key, value literal, source, difference)]} of the section."""
  section = text[text.index(SECTION):]
  end = section.find("\n## ", len(SECTION))
  section = section if end < 0 else section[:end]
  tables, current = {}, None
  for line in section.splitlines():
    heading = HEADING.match(line)
    if heading:
      current = tables.setdefault((heading.group(1), heading.group(2)), [])
      continue
    row = ROW.match(line)
    if row and current is not None:
      current.append(tuple(part.strip() for part in row.groups()))
    elif line.startswith("| `") and current is not None:
      raise AssertionError(f"a table row the test cannot read: {line!r}")
  return tables


def same(expected, actual, rel_tol: float = 1e-4) -> bool:
  """Equality with float tolerance (tables print rounded fractions) and tuples for lists."""
  if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
    return len(expected) == len(actual) and all(same(e, a, rel_tol)
                                                for e, a in zip(expected, actual))
  if isinstance(expected, bool) or isinstance(actual, bool):
    return expected is actual
  if isinstance(expected, int) and isinstance(actual, int):
    return expected == actual  # step counts, sizes: exact
  if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
    if 0.9 < expected < 1.0:  # decay rates: compare 1 - x (0.9999 against 0.99995 differ)
      return math.isclose(1.0 - expected, 1.0 - actual, rel_tol=10 * rel_tol)
    return math.isclose(expected, actual, rel_tol=rel_tol, abs_tol=1e-12)
  return expected == actual


def lookup(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


TABLES = parse(open(os.path.join(REPO, "BUILD.md")).read())


def test_every_paper_preset_has_a_table_of_sourced_rows():
  assert {name for name, _ in TABLES} == set(PAPER_PRESETS)
  for (name, preset), rows in TABLES.items():
    assert len(rows) >= (10 if preset is None else 1), (name, preset)
    for key, _, source, _ in rows:
      assert source, f"{name}:{preset} {key} names no source"


@pytest.mark.parametrize("name, preset", sorted(TABLES, key=lambda k: (k[0], k[1] or "")))
def test_table_rows_hold_for_the_preset(name, preset):
  config = config_lib.load_experiment(os.path.join(REPO, "experiments", f"{name}.py"), preset)
  wrong = []
  for key, literal, _, _ in TABLES[(name, preset)]:
    expected = ast.literal_eval(literal)
    actual = lookup(config, key)
    if not same(expected, actual):
      wrong.append(f"{key}: table {expected!r}, preset {actual!r}")
  assert not wrong, f"experiments/{name}.py:{preset}: " + "; ".join(wrong)


# The keys that set how a preset trains. Each base table lists every one its config has, so that
# no flowjax default (optim.grad_clip's 1.0, an EMA the paper does not keep) stands silently for a
# paper's value. A key of parameter sets counts for the key it copies (optim.sets.<set>.lr: lr).
TRAINING_KEYS = ("optim.name", "optim.lr", "optim.b2", "optim.weight_decay", "optim.grad_clip",
                 "optim.schedule", "optim.ema_decays", "train.batch_size", "train.steps",
                 "model.dropout")
# Presets derived from another experiment: keys they do not list are their parent's, whose rows
# must then hold for them too.
DERIVED = {"fdistill_cifar10": "dmd2_cifar10", "fdistill_imagenet64": "dmd2_imagenet64"}


def has_key(config, key: str) -> bool:
  try:
    lookup(config, key)
    return True
  except KeyError:
    return False


def training_keys_missing(name: str, rows, config) -> list[str]:
  listed = {key for key, _, _, _ in rows}
  covered = lambda key: key in listed or any(
      k.startswith("optim.sets.") and k.rsplit(".", 1)[1] == key.split(".", 1)[1]
      for k in listed if key.startswith("optim."))
  return [key for key in TRAINING_KEYS if has_key(config, key) and not covered(key)]


@pytest.mark.parametrize("name", sorted(name for name, preset in TABLES if preset is None))
def test_every_paper_preset_lists_its_training_keys(name):
  config = config_lib.load_experiment(os.path.join(REPO, "experiments", f"{name}.py"))
  rows = list(TABLES[(name, None)])
  if name in DERIVED:
    own = {key for key, _, _, _ in rows}
    inherited = [row for row in TABLES[(DERIVED[name], None)] if row[0] not in own]
    wrong = [key for key, literal, _, _ in inherited
             if not same(ast.literal_eval(literal), lookup(config, key))]
    assert not wrong, f"{name} differs from {DERIVED[name]}'s rows it inherits: {wrong}"
    rows += inherited
  missing = training_keys_missing(name, rows, config)
  assert not missing, f"BUILD.md's table of experiments/{name}.py lists no row for {missing}"


def test_a_wrong_row_is_caught():
  """The checker itself: a planted wrong value, a reordered tuple and an unreadable row fail."""
  text = (f"{SECTION}\n\n### `experiments/imm_cifar10.py`\n\n"
          "| key | value | source | difference |\n|---|---|---|---|\n"
          "| `objective.t_max` | `0.5` | [C] | |\n"
          "| `model.channel_mult` | `(2, 2, 2)` | [C] | |\n")
  rows = parse(text)[("imm_cifar10", None)]
  config = config_lib.load_experiment(os.path.join(REPO, "experiments", "imm_cifar10.py"))
  assert not same(ast.literal_eval(rows[0][1]), lookup(config, rows[0][0]))
  # Step counts exactly, decays by 1 - x (a relative 1e-4 would take either pair as equal).
  assert not same(2441, 2442) and not same(0.9999, 0.99995) and same(0.9999432, 0.99994317)
  assert same(ast.literal_eval(rows[1][1]), lookup(config, rows[1][0]))
  assert not same((1, 2), (2, 1)) and not same(True, 1) and same(0.58333, 1.4 / 2.4)
  with pytest.raises(AssertionError, match="cannot read"):
    parse(text + "| `objective.t_min` | 0.006 | [C] | |\n")
