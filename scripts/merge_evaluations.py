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
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

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


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("parts", nargs="+", help="per_image.npz files or directories holding one")
  parser.add_argument("--out", help="write the merged per-image scores to this .npz")
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


if __name__ == "__main__":
  main(sys.argv[1:])
