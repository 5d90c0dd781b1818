"""Training health: a divergence must show even where the loss cannot show it.

MeanFlow's adaptive weight l / (l + eps)^p with p = 1 keeps its loss near 1 whatever the error,
so a run whose error grows a thousandfold logs a flat loss. The trainer therefore logs the
unweighted error beside the loss (`error`, step.error_of) and watches two signals on the host,
from the metrics it fetches every step anyway (nothing is added to the step):

- the unweighted error: its smoothed level (an exponential moving average of log(error) over
  about SMOOTHING_STEPS steps) against the best smoothed level reached so far (from the
  SMOOTHING_STEPS-th step on, so a divergence that starts during the warm-up is measured from
  where the error stood before it); a level `factor` times the best is a divergence, however
  slowly it got there;
- the gradient norm: its smoothed level against its running level (a slow average over about
  RUNNING_STEPS steps), which catches a sudden blow-up but follows a slow drift (iCT's loss
  weights 1 / (sigma_{i+1} - sigma_i) grow as its discretisation doubles).

A non-positive error (a flow's negative log-likelihood) is not watched; non-finite values are
the trainer's train.nonfinite handling.
"""

import dataclasses
import math

ACTIONS = ("warn", "stop", "off")
SMOOTHING_STEPS = 20
RUNNING_STEPS = 500
# A smoothed level this many times its reference marks the onset named in the report.
ONSET_FACTOR = 2.0


class DivergenceError(RuntimeError):
  """Training diverged (train.on_divergence='stop')."""


_STATE = ("smoothed", "running", "best", "onset", "flagged")


@dataclasses.dataclass
class _Signal:
  name: str
  reference: str  # "best" or "running"
  smoothed: float | None = None
  running: float | None = None
  best: float | None = None
  onset: int | None = None
  flagged: bool = False


class Monitor:
  """Watches the per-step metrics for a divergence (see the module docstring).

  factor: the ratio of the smoothed level to its reference that is a divergence (> 2);
  warmup: steps before anything is flagged (counted over the whole run: a resumed run restores
    the count with the rest of the state, `state_dict`); early training moves fast;
  action: "warn" logs the report once per episode, "stop" raises DivergenceError, "off".
  """

  def __init__(self, factor: float = 5.0, warmup: int = 200, action: str = "warn"):
    if action not in ACTIONS:
      raise ValueError(f"train.on_divergence={action!r}: use one of {ACTIONS}.")
    if not factor > ONSET_FACTOR:
      raise ValueError(f"train.divergence_factor={factor} must exceed {ONSET_FACTOR}.")
    self.factor, self.warmup, self.action = factor, warmup, action
    self.signals = (_Signal("error", "best"), _Signal("grad_norm", "running"))
    self.seen = 0

  def update(self, step: int, values: dict) -> str | None:
    """Feeds one step's metrics; returns a report when a signal newly crosses `factor` times its
    reference (and raises DivergenceError instead when action='stop')."""
    if self.action == "off":
      return None
    self.seen += 1
    fast = 1.0 / SMOOTHING_STEPS
    slow = 1.0 / RUNNING_STEPS
    reports = []
    for signal in self.signals:
      value = float(values.get(signal.name, float("nan")))
      if not (math.isfinite(value) and value > 0):
        continue
      level = math.log(value)
      if signal.smoothed is None:
        signal.smoothed = signal.running = level
        continue
      signal.smoothed += fast * (level - signal.smoothed)
      signal.running += slow * (level - signal.running)
      if self.seen >= SMOOTHING_STEPS:
        signal.best = signal.smoothed if signal.best is None else min(signal.best,
                                                                      signal.smoothed)
      if self.seen <= self.warmup:
        continue
      reference = signal.best if signal.reference == "best" else signal.running
      ratio = math.exp(signal.smoothed - reference)
      if ratio < ONSET_FACTOR:
        signal.onset, signal.flagged = None, False
        continue
      if signal.onset is None:
        signal.onset = step
      if ratio >= self.factor and not signal.flagged:
        signal.flagged = True
        what = ("unweighted error" if signal.name == "error" else "gradient norm")
        against = ("its best level" if signal.reference == "best" else "its running level")
        reports.append(
            f"step {step}: the {what} (smoothed over ~{SMOOTHING_STEPS} steps) is "
            f"{math.exp(signal.smoothed):.4g}, {ratio:.0f}x {against} "
            f"{math.exp(reference):.4g}; it began rising at about step {signal.onset}")
    if not reports:
      return None
    report = "Training is diverging: " + "; ".join(reports) + "."
    if self.action == "stop":
      raise DivergenceError(report)
    return report

  def state_dict(self) -> dict:
    """The running state (JSON): a checkpoint carries it, so that a resumed run watches as the
    uninterrupted one would (no second warm-up, the same best level)."""
    return {"seen": self.seen, "signals": {s.name: {key: getattr(s, key) for key in _STATE}
                                           for s in self.signals}}

  def load_state_dict(self, state: dict | None) -> None:
    """Restores `state_dict()`'s output; None (a checkpoint written without it) keeps the
    fresh state."""
    if not state:
      return
    self.seen = int(state["seen"])
    for signal in self.signals:
      for key, value in state["signals"].get(signal.name, {}).items():
        if key in _STATE:
          setattr(signal, key, value)

  def onset(self) -> int | None:
    """The earliest step at which a signal now above ONSET_FACTOR x its reference began rising."""
    onsets = [signal.onset for signal in self.signals if signal.onset is not None]
    return min(onsets) if onsets else None
