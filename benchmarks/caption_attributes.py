r"""What a synthetic-world caption gets right: colour, shape and size against its reference.

  python benchmarks/caption_attributes.py --predictions=W/eval/vg_loca_val.predictions.jsonl \
      [--out=benchmarks/results/caption_attributes.json]

Reads a caption evaluator's per-example rows (`prediction`, `references`; e.g. the
location-conditioned captioning toy's) and, for each attribute the first reference names
("a small red circle": size, colour, shape), whether the prediction names the same one. CIDEr
rewards the template words too; this says which of the words that depend on the image are right.
Chance is one over the number of values of the attribute (`pixel_llm.data.synthetic`). Prints a
table; writes JSON with --out.
"""
import argparse
import os
import re
import sys

from pixel_llm.data import synthetic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prediction_files  # pylint: disable=g-import-not-at-top

ATTRIBUTES = {"colour": tuple(synthetic.COLORS), "shape": synthetic.SHAPES,
              "size": tuple(synthetic.SIZES)}


def named(text: str, values) -> str | None:
  """The first of `values` that `text` names as a word, or None."""
  words = re.findall(r"[a-z]+", text.lower())
  return next((w for w in words if w in values), None)


def score(rows: list[dict]) -> dict:
  table = {}
  for attribute, values in ATTRIBUTES.items():
    pairs = [(named(r["prediction"], values), named(r["references"][0], values)) for r in rows
             if r["references"] and named(r["references"][0], values) is not None]
    right = sum(p == g for p, g in pairs)
    table[attribute] = {"n": len(pairs), "accuracy": right / len(pairs) if pairs else 0.0,
                        "chance": 1.0 / len(values)}
  return table


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--predictions", required=True, help="W/eval/<name>.predictions.jsonl")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  rows = prediction_files.read(args.predictions, {"prediction", "references"}, "a caption "
                              "evaluator's")
  table = score(rows)
  print(f"{'attribute':<8} {'n':>5} {'accuracy':>8} {'chance':>6}")
  for name, s in table.items():
    print(f"{name:<8} {s['n']:>5} {s['accuracy']:>8.3f} {s['chance']:>6.3f}")
  if args.out:
    prediction_files.write(args.out, args.predictions, "attributes", table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
