"""Scores a text-to-image workdir trained on the captioned digits (`flowjax.evals.text_digits`):
every caption as a prompt, label accuracy and ink per style, per CFG scale; and the README table
of such result files.

  python -m flowjax.text_eval --workdir=workdirs/starflow_digits_text --guidance=1,2,3 \
      --num=100 --seed=0 --out=experiments/results/starflow_digits_text_seed0.json \
      [--figure=experiments/gallery/starflow_digits_text.png]
  python -m flowjax.text_eval \
      --report=experiments/results/starflow_digits_text_seed0.json,...   (the README table)
"""

import argparse
import json
import os
import sys

from flowjax.evals import text_digits


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="")
  parser.add_argument("--report", default="", help="comma-separated result files: print the "
                      "README table of their mean ± std and stop")
  parser.add_argument("--guidance", default="1", help="comma-separated CFG scales")
  parser.add_argument("--num", type=int, default=100, help="samples per prompt")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="")
  parser.add_argument("--figure", default="", help="PNG of samples at the last CFG scale")
  args = parser.parse_args(argv)
  if args.report:
    results = []
    for path in args.report.split(","):
      with open(path) as f:
        results.append(json.load(f))
    print(text_digits.report(results))
    return
  if not args.workdir:
    parser.error("--workdir is required (or --report)")
  from flowjax import api, provenance
  trained = api.load(args.workdir)
  command = "python -m flowjax.text_eval " + " ".join(sys.argv[1:] if argv is None else argv)
  scores = text_digits.evaluate(trained, guidance=[float(g) for g in args.guidance.split(",")],
                    num=args.num, seed=args.seed, keep_samples=bool(args.figure))
  if args.figure:
    from PIL import Image
    Image.fromarray(text_digits.figure(scores.pop("samples"), args.num)).save(args.figure)
  result = {**provenance.header(command), "workdir": args.workdir, "step": trained.step,
            "config_seed": int(trained.config.seed), **scores}
  # The run's own test-split evaluation at that step (bits/dim of a STARFlow), when it wrote one.
  from flowjax import storage
  evaluated = storage.join(args.workdir, "eval", f"step_{trained.step}.json")
  if storage.exists(evaluated):
    result["eval"] = json.loads(storage.read_text(evaluated))
  text = json.dumps(result, indent=2)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
