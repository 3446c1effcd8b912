"""Explains image files with a trained explainer:

  python -m l2r_jax.explain --workdir /tmp/l2r_vit --out /tmp/maps photo.jpg other.png

For each image: the target's top-1 class (or --class_index), the explainer's map (refined with
--refine_steps > 0), written as `<name>.npy` (f32[H, W] at the target's input size) and
`<name>.png` (the preprocessed image beside the map over it) in --out.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from l2r_jax import checks
from l2r_jax import explainer as explainer_lib
from l2r_jax import refine as refine_lib


def explain_files(workdir: str, paths: Sequence[str], out: str, class_index: int | None = None,
                  refine_steps: int = 0) -> list[dict]:
  """Maps of image files (see the module docstring); returns per image {'path', 'class',
  'class_name', 'probability', 'npy', 'png'}."""
  from l2r_jax import evaluate
  from l2r_jax import train
  from l2r_jax.data import sources

  if not paths:
    raise ValueError("give at least one image file to explain")
  for p in paths:
    checks.existing_path(p, "IMAGE", "an image to explain", "file", noun="image file")
  config, target, model, params, backbone = evaluate.load_run(workdir)
  if class_index is not None and not 0 <= class_index < target.num_classes:
    raise ValueError(f"--class_index must be in [0, {target.num_classes}), got {class_index}")
  preprocess = train.preprocessing(config, target)
  images = jnp.asarray(np.stack([preprocess(sources.decode_image(p)) for p in paths]))
  logits = target.apply(target.variables, images)
  classes = (jnp.argmax(logits, -1).astype(jnp.int32) if class_index is None
             else jnp.full((len(paths),), class_index, jnp.int32))
  probs = jax.nn.softmax(logits)[jnp.arange(len(paths)), classes]
  maps = explainer_lib.explain(model, params, target, target.variables, images, classes,
                               backbone, None if backbone is None else backbone.variables)
  if refine_steps:
    cfg = evaluate.refine_settings(config, refine_steps)
    # Fewer images than devices: each image's refinement samples spread over the devices.
    mesh = (train.data_mesh(jax.local_devices()) if jax.local_device_count() > len(paths)
            else None)
    maps, _ = refine_lib.refine(target.apply_fn(), images, maps, classes, jax.random.key(0), cfg,
                                mesh=mesh)
  os.makedirs(out, exist_ok=True)
  from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it is
  results = []
  for i, path in enumerate(paths):
    name = os.path.splitext(os.path.basename(path))[0]
    m = np.asarray(maps[i])
    np.save(os.path.join(out, f"{name}.npy"), m)
    c = int(classes[i])
    label = target.class_names[c] if target.class_names else str(c)
    fig = Figure(figsize=(6, 3))
    axes = fig.subplots(1, 2)
    image = np.asarray(images[i])
    axes[0].imshow(image)
    axes[0].set_title(f"{label} (p {float(probs[i]):.2f})", fontsize=8)
    evaluate.overlay(axes[1], image, m)
    axes[1].set_title("L2R" + (f" + {refine_steps} refinement steps" if refine_steps else ""),
                      fontsize=8)
    axes[0].axis("off")
    fig.tight_layout()
    png = os.path.join(out, f"{name}.png")
    fig.savefig(png, dpi=100)
    results.append({"path": path, "class": c, "class_name": label,
                    "probability": float(probs[i]), "npy": os.path.join(out, f"{name}.npy"),
                    "png": png})
  return results


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  flags_ = flags.FLAGS
  for r in explain_files(flags_.workdir, argv[1:], flags_.out, flags_.class_index,
                         flags_.refine_steps):
    print(f"{r['path']}: class {r['class']} ({r['class_name']}, p {r['probability']:.3f}) -> "
          f"{r['png']}")


if __name__ == "__main__":
  from absl import app
  from absl import flags
  flags.DEFINE_string("workdir", None, "a training workdir (train.py --workdir)")
  flags.DEFINE_string("out", "explanations", "folder for the maps and pictures")
  flags.DEFINE_integer("class_index", None, "explain this class (default: the top-1)")
  flags.DEFINE_integer("refine_steps", 0, "test-time refinement steps")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
