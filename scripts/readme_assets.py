"""Regenerates README.md's picture and results table from a run of README's own commands:

  python train.py --config configs/vit.py --workdir /tmp/l2r_vit
  python evaluate.py --workdir /tmp/l2r_vit --num_examples 100 --protocols paper,black,blur
  python scripts/readme_assets.py --workdir /tmp/l2r_vit

copies the run's `examples.png` to docs/examples.png and rewrites the table between the
`<!-- results:begin -->` and `<!-- results:end -->` lines of README.md from its `results.json`
and, for the strongest baseline's paired gap to the refined map, its `per_image.npz` (never by
hand: tests/test_readme.py runs this on a smoke run). --block names another pair of
markers (`<!-- NAME:begin -->` ... `<!-- NAME:end -->`), for the tables of other benchmarks.
--workdir may also be the --out_dir of scripts/merge_evaluations.py: an evaluation run in parts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

from compare_runs import mean_se

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def markers(block: str) -> tuple[str, str]:
  return f"<!-- {block}:begin", f"<!-- {block}:end -->"
LOWER_IS_BETTER = {"deletion": True, "insertion": False}


def table(results: dict, per_image: dict[str, np.ndarray] | None = None) -> str:
  """Markdown: a row per method, deletion / insertion AUC (mean +- s.e.) per protocol, seconds
  per image; the best mean of each column in bold; then `paired_table` (`per_image`: the run's
  per_image.npz, for its gaps to the refined map)."""
  methods = results["methods"]
  protocols = [p for p in results["protocols"] if results["protocols"][p] != "chefer"]
  if not protocols:
    raise ValueError("results.json has no deletion / insertion protocol to tabulate")
  columns = [(p, k) for p in protocols for k in ("deletion", "insertion")]
  best = {}
  for p, k in columns:
    means = [row[p][k]["mean"] for row in methods.values()]
    best[p, k] = min(means) if LOWER_IS_BETTER[k] else max(means)
  n = next(iter(methods.values()))[protocols[0]]["deletion"]["n"]
  where = (f" Seconds per image on {results['devices']}, jax {results['jax']}, {results['date']}."
           if "devices" in results else "")
  lines = [f"Held-out {results['target']} images of split {results['split']!r}, n = {n}; "
           f"AUC mean +- standard error (deletion: lower is better, insertion: higher).{where}", "",
           "| method | " + " | ".join(f"{k} ({p})" for p, k in columns) + " | s / image |",
           "| --- |" + " --- |" * len(columns) + " --- |"]
  for method, row in methods.items():
    cells = []
    for p, k in columns:
      s = row[p][k]
      cell = f"{s['mean']:.3f} +- {s['se']:.3f}"
      cells.append(f"**{cell}**" if s["mean"] == best[p, k] else cell)
    lines.append(f"| {method} | " + " | ".join(cells) + f" | {row['seconds_per_image']:.4f} |")
  paired = paired_table(results, columns, per_image)
  return "\n".join(lines + (["", paired] if paired else []))


def paired_table(results: dict, columns: list[tuple[str, str]],
                 per_image: dict[str, np.ndarray] | None = None) -> str:
  """Markdown: per column, the refined map and the strongest baseline against the single pass,
  as paired per-image differences (method - l2r, mean +- s.e., z = mean / s.e.): the same images
  under both, so the gap's standard error is that of the differences, not of either mean. With
  `per_image` (the run's per_image.npz) and a refined map among the methods, a last column gives
  the strongest baseline against the refined map, paired the same way. Empty when results.json
  has no paired differences (no 'l2r' among its methods)."""
  methods = results["methods"]
  if "l2r" not in methods:
    return ""

  def cell(mean, se):
    z = f"{mean / se:+.1f}" if se > 0 else "n/a"
    return f"{mean:+.3f} +- {se:.3f} (z {z})"

  def diff(method, p, k):
    d = methods[method][p].get(f"{k}_minus_l2r")
    return "-" if d is None else cell(d["mean"], d["se"])

  def diff_refined(method, p, k):
    """method - l2r_refined per image, from per_image.npz (both rows are the same images)."""
    missing = [m for m in (method, "l2r_refined") if f"{m}/{p}/{k}" not in per_image]
    if missing:
      raise ValueError(f"per_image.npz has no {p} {k} scores of {', '.join(missing)}: it is not "
                       f"from the evaluation that wrote results.json")
    a, b = per_image[f"{method}/{p}/{k}"], per_image[f"l2r_refined/{p}/{k}"]
    if not len(a) == len(b) == methods[method][p][k]["n"]:
      raise ValueError(f"per_image.npz has {len(a)} / {len(b)} scores of {method} / l2r_refined "
                       f"for {p} {k}, results.json {methods[method][p][k]['n']}: they are not "
                       f"from the same evaluation")
    return cell(*mean_se(a.astype(np.float64) - b.astype(np.float64)))

  refined = "l2r_refined" in methods
  against_refined = refined and per_image is not None
  baselines = [m for m in methods if not m.startswith("l2r")]
  heads = ["protocol", "metric", "l2r", "l2r_refined - l2r", "best baseline", "baseline - l2r"]
  if against_refined:
    heads.append("baseline - l2r_refined")
  lines = ["Paired per image against the single pass (method - l2r, mean +- s.e., z = mean / "
           "s.e.; a win for l2r is a positive deletion gap and a negative insertion gap)"
           + (" and, last column, the best baseline against the refined map:" if against_refined
              else ":"), "",
           "| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
  for p, k in columns:
    l2r = methods["l2r"][p][k]
    cells = [p, k, f"{l2r['mean']:.3f} +- {l2r['se']:.3f}",
             diff("l2r_refined", p, k) if refined else "-"]
    means = {m: methods[m][p][k]["mean"] for m in baselines}
    best = (min if LOWER_IS_BETTER[k] else max)(means, key=means.get) if means else None
    cells += [f"{best} ({means[best]:.3f})", diff(best, p, k)] if best else ["-", "-"]
    if against_refined:
      cells.append(diff_refined(best, p, k) if best else "-")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def rewrite(readme: str, block: str, name: str = "results") -> str:
  """`readme` with the text between its `name` markers replaced by `block`."""
  begin, finish = markers(name)
  start, end = readme.find(begin), readme.find(finish)
  if start < 0 or end < start:
    raise ValueError(f"README has no {begin} ... {finish} block to rewrite")
  start = readme.index("\n", start) + 1
  return readme[:start] + block + "\n" + readme[end:]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a run evaluated by evaluate.py")
  parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
  parser.add_argument("--figure", default=os.path.join(ROOT, "docs", "examples.png"))
  parser.add_argument("--block", default="results", help="README's markers to write between")
  args = parser.parse_args()
  for name in ("results.json", "examples.png"):
    if not os.path.exists(os.path.join(args.workdir, name)):
      parser.error(f"{args.workdir} has no {name}: run python evaluate.py --workdir "
                   f"{args.workdir} first")
  with open(os.path.join(args.workdir, "results.json")) as f:
    results = json.load(f)
  per_image = None
  if os.path.exists(os.path.join(args.workdir, "per_image.npz")):
    with np.load(os.path.join(args.workdir, "per_image.npz")) as data:
      per_image = dict(data)
  os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
  shutil.copy(os.path.join(args.workdir, "examples.png"), args.figure)
  with open(args.readme) as f:
    text = rewrite(f.read(), table(results, per_image), args.block)
  with open(args.readme, "w") as f:
    f.write(text)
  print(f"wrote {args.figure} and the results table of {args.readme}")


if __name__ == "__main__":
  main()
