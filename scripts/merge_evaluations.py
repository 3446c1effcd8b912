"""Merges the parts of an evaluation run in chunks into one table: the per_image.npz files that
`evaluate.py --chunk START:STOP --output_dir D` wrote, one per chunk of the same draw.

  python evaluate.py --workdir W --chunk 0:40 --output_dir W/part0 ...
  python evaluate.py --workdir W --chunk 40:160 --output_dir W/part1 ...
  python scripts/merge_evaluations.py W/part0 W/part1 --out W/merged.npz

Each part is a directory holding per_image.npz, or the file itself. The parts must hold disjoint
images (checked on '_index', each image's index in the held-out split; a part written before
evaluate.py recorded it can only be merged with --assume_disjoint). The scores merged are those
every part has; the others are named and left out. Printed per protocol: each method's mean +-
standard error over all the parts' images, and where 'l2r' was scored, each other method's paired
per-image difference to it (the s.e. of the differences shows whether a gap is real). With
--out, the merged per-image scores are written there, in the split's order (the order one
evaluation of the same images gives; the parts' order for --assume_disjoint), for
scripts/compare_runs.py.

With --out_dir D, D becomes what one evaluation of all the parts' images would have written, for
scripts/readme_assets.py: per_image.npz, results.json (each method's mean, standard error and n
per score from the merged per-image scores; its seconds per image averaged over the parts,
weighted by their images; the mean paper curves likewise), results.md and curves.png, and the
examples.png of the part holding the draw's first images. That needs each part's results.json
beside its per_image.npz, all from one run, draw, set of protocols and refinement (checked); the
methods merged are those every part evaluated. Where the parts ran on different machines, jax
versions or dates, results.json names each ("a / b").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

from l2r_jax import evaluate
from l2r_jax.evaluate import LOWER_IS_BETTER

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_runs import load, mean_se  # noqa: E402 (the sibling script, not a package)


def merge(parts: list[dict[str, np.ndarray]], names: list[str],
          assume_disjoint: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
  """(the parts' per-image arrays concatenated and put in the split's order, the keys left out
  because a part lacks them)."""
  if not parts:
    raise ValueError("give at least one part (a per_image.npz or the directory holding it)")
  unindexed = [n for p, n in zip(parts, names) if "_index" not in p]
  if unindexed and not assume_disjoint:
    raise ValueError(f"{', '.join(unindexed)} hold no '_index' (written before evaluate.py "
                     f"recorded each image's index in the split), so the parts cannot be checked "
                     f"to hold different images; merge with --assume_disjoint if you know they "
                     f"do (e.g. disjoint --chunk ranges of one draw)")
  if not unindexed:
    seen: dict[int, str] = {}
    for p, n in zip(parts, names):
      for i in p["_index"].tolist():
        if i in seen:
          raise ValueError(f"image {i} of the split is in both {seen[i]} and {n}: the parts "
                           f"must be disjoint chunks (evaluate.py --chunk) of one draw")
        seen[i] = n
  common = set.intersection(*(set(p) for p in parts))
  if unindexed:
    common.discard("_index")
  dropped = sorted(set.union(*(set(p) for p in parts)) - common - {"_index"})
  for key in ("_labels", "_predicted"):
    if key not in common:
      raise ValueError(f"a part holds no {key!r}: not a per_image.npz of evaluate.py")
  lengths = [len(p["_labels"]) for p in parts]
  for key in sorted(common):
    for p, n, length in zip(parts, names, lengths):
      if len(p[key]) != length:
        raise ValueError(f"{n}: {key!r} has {len(p[key])} entries for {length} images")
  merged = {k: np.concatenate([p[k] for p in parts]) for k in sorted(common)}
  if not unindexed:  # the split's order, as one evaluation of these images would give them
    order = np.argsort(merged["_index"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
  return merged, dropped


def markdown(merged: dict[str, np.ndarray]) -> str:
  """One table per protocol: method x score, mean +- s.e. (n), and the paired gap to l2r."""
  scores = [k.split("/") for k in merged if not k.startswith("_")]
  methods = list(dict.fromkeys(m for m, _, _ in scores))
  if "l2r" in methods:
    methods.insert(0, methods.pop(methods.index("l2r")))
  protocols = list(dict.fromkeys(p for _, p, _ in scores))
  lines = [f"{len(merged['_labels'])} images", ""]
  for protocol in protocols:
    keys = list(dict.fromkeys(k for _, p, k in scores if p == protocol))
    heads = [f"{k} ({'lower' if LOWER_IS_BETTER.get(k, True) else 'higher'} is better)"
             for k in keys]
    paired = "l2r" in methods and len(methods) > 1
    if paired:
      heads += [f"{k}: method - l2r" for k in keys]
    lines += [f"## {protocol}", "", "| method | " + " | ".join(heads) + " |",
              "| --- | " + " | ".join("---" for _ in heads) + " |"]
    for method in methods:
      cells, diffs = [], []
      for k in keys:
        x = merged.get(f"{method}/{protocol}/{k}")
        if x is None:
          cells.append("")
          diffs.append("")
          continue
        cells.append("{:.4f} +- {:.4f}".format(*mean_se(x)))
        ref = merged.get(f"l2r/{protocol}/{k}")
        if method == "l2r" or ref is None:
          diffs.append("")
        else:
          d, s = mean_se(x - ref)
          diffs.append(f"{d:+.4f} +- {s:.4f}" + (f" (z {d / s:+.1f})" if s > 0 else ""))
      lines.append(f"| {method} | " + " | ".join(cells + (diffs if paired else [])) + " |")
    lines.append("")
  return "\n".join(lines)


def merge_results(results: list[dict], merged: dict[str, np.ndarray],
                  names: list[str]) -> dict:
  """One results.json for the parts' results.json files (`results`, in `names`' order) and their
  merged per-image scores (`merge`): the statistics recomputed from the per-image scores, as
  evaluate.py computes them over one evaluation of the same images."""
  if len(results) != len(names) or not results:
    raise ValueError("give one results.json per part")
  first = results[0]
  for key in ("workdir", "split", "target", "protocols"):
    for r, n in zip(results[1:], names[1:]):
      if r.get(key) != first.get(key):
        raise ValueError(f"{n} and {names[0]} differ in {key!r} ({r.get(key)!r} against "
                         f"{first.get(key)!r}): the parts must be chunks of one evaluation")
  draws = {r["examples"]["num_examples"] for r in results}
  if len(draws) != 1:
    raise ValueError(f"the parts are chunks of different draws (num_examples {sorted(draws)}): "
                     f"evaluate every chunk with the same --num_examples")
  methods = [m for m in first["methods"] if all(m in r["methods"] for r in results)]
  if not methods:
    raise ValueError(f"no method was evaluated in every part ({', '.join(names)})")
  if "l2r_refined" in methods:
    for r, n in zip(results[1:], names[1:]):
      if r.get("refine") != first.get("refine"):
        raise ValueError(f"{n} refined with {r.get('refine')} and {names[0]} with "
                         f"{first.get('refine')}: 'l2r_refined' must be one refinement")
  sizes = np.asarray([r["examples"]["n"] for r in results], np.float64)
  total = int(sizes.sum())
  if total != len(merged["_labels"]):
    raise ValueError(f"the parts' results.json count {total} images, their per_image.npz "
                     f"{len(merged['_labels'])}: a results.json is not its per_image.npz's")

  def joined(key: str) -> str:  # one value, or each part's ("a / b")
    return " / ".join(dict.fromkeys(str(r[key]) for r in results if key in r))

  out = {k: first[k] for k in ("workdir", "split", "target")}
  out.update({k: joined(k) for k in ("devices", "jax", "date") if k in first})
  limit = first["examples"]["num_examples"]
  ranges: list[list[int]] = []  # the parts' chunks of the draw, adjacent ones joined
  for start, stop in sorted(tuple(r["examples"]["chunk"] or (0, total)) for r in results):
    if ranges and ranges[-1][1] == start:
      ranges[-1][1] = stop
    else:
      ranges.append([start, stop])
  # (a draw of all the split, num_examples 0, is whole only where a part was not a chunk)
  whole = ((limit > 0 and ranges == [[0, limit]])
           or any(r["examples"]["chunk"] is None for r in results))
  out["examples"] = {"num_examples": limit, "chunk": None if whole else ranges, "n": total,
                     "parts": list(names)}
  out["methods"] = {}
  out["protocols"] = first["protocols"]
  if "l2r_refined" in methods and "refine" in first:
    out["refine"] = first["refine"]
  for method in methods:
    seconds = [r["methods"][method]["seconds_per_image"] for r in results]
    row: dict = {"seconds_per_image": float(np.dot(seconds, sizes) / sizes.sum())}
    for protocol in first["protocols"]:
      keys = [k for k in first["methods"][method][protocol] if not k.endswith("_minus_l2r")]
      row[protocol] = {}
      for k in keys:
        x = merged.get(f"{method}/{protocol}/{k}")
        want = sum(r["methods"][method][protocol][k]["n"] for r in results)
        if x is None or len(x) != want:
          raise ValueError(f"{method}'s {protocol} {k}: the per_image.npz files hold "
                           f"{0 if x is None else len(x)} scores, the results.json files count "
                           f"{want}: a results.json is not its per_image.npz's")
        x = x.astype(np.float64)
        mean, se = mean_se(x)
        row[protocol][k] = {"mean": mean, "se": se, "n": len(x)}
        ref = merged.get(f"l2r/{protocol}/{k}")
        if method != "l2r" and "l2r" in methods and ref is not None:
          mean, se = mean_se(x - ref.astype(np.float64))
          row[protocol][f"{k}_minus_l2r"] = {"mean": mean, "se": se, "n": len(x)}
    out["methods"][method] = row
  if all("curves" in r for r in results):  # means over each part's images: weight by them
    weights = [r["methods"][methods[0]]["paper"]["deletion"]["n"] for r in results]
    out["curves"] = {m: {k: (np.average([r["curves"][m][k] for r in results], axis=0,
                                         weights=weights)).tolist()
                         for k in ("deletion", "insertion")} for m in methods}
  return out


def write_dir(out_dir: str, merged: dict[str, np.ndarray], results: dict,
              first_part: str) -> list[str]:
  """Writes what one evaluation of the merged images would have (module docstring), the figure
  from `first_part`, the directory of the part holding the draw's first images; the names
  written."""
  os.makedirs(out_dir, exist_ok=True)
  written = ["per_image.npz", "results.json", "results.md"]
  np.savez(os.path.join(out_dir, "per_image.npz"), **merged)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(evaluate.markdown(results))
  if "curves" in results:
    evaluate.plot_curves(results, os.path.join(out_dir, "curves.png"))
    written.append("curves.png")
  figure = os.path.join(first_part, "examples.png")
  if os.path.exists(figure):
    shutil.copy(figure, os.path.join(out_dir, "examples.png"))
    written.append("examples.png")
  return written


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("parts", nargs="+", help="per_image.npz files or directories holding one")
  parser.add_argument("--out", help="write the merged per-image scores to this .npz")
  parser.add_argument("--out_dir", help="write per_image.npz, results.json, results.md, "
                      "curves.png and examples.png of the merged evaluation there (module "
                      "docstring; each part a directory holding its results.json too)")
  parser.add_argument("--assume_disjoint", action="store_true",
                      help="merge parts that hold no '_index' (they cannot be checked)")
  args = parser.parse_args(argv)
  loaded = [load(p)[::2] for p in args.parts]  # (arrays, file)
  try:
    merged, dropped = merge([a for a, _ in loaded], [f for _, f in loaded],
                            assume_disjoint=args.assume_disjoint)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  if dropped:
    print(f"left out (not in every part): {', '.join(dropped)}\n")
  print(markdown(merged))
  if args.out:
    np.savez(args.out, **merged)
    print(f"wrote {args.out}")
  if args.out_dir:
    dirs = [os.path.dirname(f) for _, f in loaded]
    missing = [d for d in dirs if not os.path.isfile(os.path.join(d, "results.json"))]
    if missing or args.assume_disjoint:
      raise SystemExit("--out_dir needs each part's directory with its results.json and indexed "
                       "per_image.npz (evaluate.py --chunk ... --output_dir D); "
                       + (f"none in {', '.join(missing)}" if missing else
                          "not with --assume_disjoint"))
    results = []
    for d in dirs:
      with open(os.path.join(d, "results.json")) as f:
        results.append(json.load(f))
    try:
      combined = merge_results(results, merged, dirs)
    except ValueError as e:
      raise SystemExit(str(e)) from None
    first_part = min(zip(loaded, dirs), key=lambda p: p[0][0]["_index"].min())[1]
    written = write_dir(args.out_dir, merged, combined, first_part)
    print(f"wrote {args.out_dir}: {', '.join(written)}")


if __name__ == "__main__":
  main(sys.argv[1:])
