"""Does a text-to-image model on the captioned digits follow its prompts?

Every caption of `flowjax.data.digits` ("a [thin |thick ]handwritten <digit>", 30 prompts) is
sampled `num` times at each CFG scale; the committed digits classifier (`flowjax.evals.digits`)
scores each sample against the digit its prompt names (label accuracy), and the ink of the
samples (the sum of the 64 pixel intensities in [0, 1]) is compared between the thin, plain and
thick prompts with the real digits' ink under the same captions.

The command (a driver outside flowjax.evals, which reaches trained models only through what it
is given): `python -m flowjax.text_eval --workdir=W ...` (see flowjax/text_eval.py).

The figure shows, at the last CFG scale, 4 samples of each prompt: one column per digit, rows of
4 for the thin, plain and thick prompts (top to bottom).
"""


import numpy as np

from flowjax.data import digits as digits_data


def ink(images) -> np.ndarray:
  """[N] sum of the pixel intensities of [N, 8, 8, 1] images in [-1, 1], mapped to [0, 1]."""
  images = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
  return ((images + 1.0) * 0.5).reshape(len(images), -1).sum(axis=1)


def real_ink_by_style() -> dict:
  """Mean ink of the real digits under each style of caption."""
  images, _ = digits_data.load(digits_data.NATIVE_SIZE)
  captions = np.asarray(digits_data.captions())
  values = ink(images)
  return {style or "plain": float(values[np.char.startswith(
      captions, f"a {style + ' ' if style else ''}handwritten")].mean())
      for style in digits_data.STYLES}


FIGURE_ROWS = 4


def figure(samples: np.ndarray, num: int) -> np.ndarray:
  """The picture of `evaluate`'s samples of one CFG scale ([30 * num, 8, 8, 1], prompts in
  style-major order): columns = digits, FIGURE_ROWS rows per style."""
  by_prompt = samples.reshape(len(digits_data.STYLES), digits_data.NUM_CLASSES, num,
                              *samples.shape[1:])[:, :, :FIGURE_ROWS]
  cells = np.transpose(by_prompt, (0, 2, 1) + tuple(range(3, by_prompt.ndim)))
  from flowjax import metrics
  return metrics.image_grid(cells.reshape(-1, *samples.shape[1:]),
                            columns=digits_data.NUM_CLASSES)


def evaluate(trained, *, guidance=(1.0,), num: int = 100, seed: int = 0,
             keep_samples: bool = False) -> dict:
  """{'guidance=g': {accuracy, accuracy_by_style, ink_by_style, fd, fd_floor}, 'real_ink_by_style'}
  for a text model `trained`: anything with `sample(num, prompts=[...], guidance=g, seed=s)`
  returning [num, 8, 8, 1] images (flowjax.api.Trained); with keep_samples, also
  'samples': the last scale's samples [30 * num, 8, 8, 1] (prompts in style-major order)."""
  from flowjax.evals import digits as digits_eval
  prompts = [(label, style, digits_data.caption(label, style))
             for style in digits_data.STYLES for label in range(digits_data.NUM_CLASSES)]
  result = {"real_ink_by_style": real_ink_by_style(), "num_per_prompt": num, "seed": seed,
            "prompts": [p for _, _, p in prompts]}
  for g in guidance:
    samples, labels, styles = [], [], []
    for index, (label, style, prompt) in enumerate(prompts):
      samples.append(trained.sample(num, prompts=[prompt], guidance=g, seed=seed * 1000 + index))
      labels += [label] * num
      styles += [style or "plain"] * num
    samples = np.concatenate(samples)
    labels, styles = np.asarray(labels), np.asarray(styles)
    scores = digits_eval.evaluate(samples, labels, seed=seed)
    predicted = np.argmax(digits_eval._default_classifier().logits(
        np.clip(samples, -1.0, 1.0)), -1)
    values = ink(samples)
    result[f"guidance={g:g}"] = {
        "accuracy": scores["accuracy"], "accuracy_real": scores["accuracy_real"],
        "fd": scores["fd"], "fd_floor": scores["fd_floor"],
        "accuracy_by_style": {s: float(np.mean(predicted[styles == s] == labels[styles == s]))
                              for s in ("thin", "plain", "thick")},
        "ink_by_style": {s: float(values[styles == s].mean()) for s in ("thin", "plain", "thick")},
    }
  if keep_samples:
    result["samples"] = samples
  return result


def _spread(values) -> str:
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return f"{values.mean():.3f}"
  return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def report(results: list[dict]) -> str:
  """A markdown table of result files (one per seed): per CFG scale, label accuracy, FD and ink
  per style of prompt, mean ± standard deviation over the files."""
  scales = [k for k in results[0] if k.startswith("guidance=")]
  lines = ["| guidance | label accuracy | FD | ink: thin | plain | thick |",
           "|---|---|---|---|---|---|"]
  for scale in scales:
    cells = [_spread([r[scale]["accuracy"] for r in results]),
             _spread([r[scale]["fd"] for r in results])]
    cells += [_spread([r[scale]["ink_by_style"][style] for r in results])
              for style in ("thin", "plain", "thick")]
    lines.append(f"| {scale.split('=')[1]} | " + " | ".join(cells) + " |")
  bits = [r["eval"]["eval_bits_per_dim"] for r in results if "eval_bits_per_dim" in
          r.get("eval", {})]
  if bits:
    lines += ["", f"Test bits/dim of the runs: {_spread(bits)}."]
  return "\n".join(lines)
