"""Reading an evaluator's per-example predictions file and writing a breakdown of it as JSON
(shared by the scripts that break evaluations down: referring_breakdown, caption_attributes)."""
import json
import sys


def read(path: str, fields: set[str], what: str) -> list[dict]:
  """The rows of W/eval/<name>.predictions.jsonl; exits with a message when there are none or
  they lack any of `fields` (`what`: the evaluator whose file is needed)."""
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows:
    raise SystemExit(f"{path}: no prediction rows")
  missing = fields - set(rows[0])
  if missing:
    raise SystemExit(f"{path}: rows lack {sorted(missing)} ({what} predictions file is needed)")
  return rows


def write(out: str, predictions: str, key: str, table: dict, **more) -> None:
  """{"predictions": the file read, key: table, **more, "command": this command line} into
  `out`."""
  with open(out, "w") as f:
    json.dump({"predictions": predictions, key: table, **more, "command": " ".join(sys.argv)}, f,
              indent=1)
