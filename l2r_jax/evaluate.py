"""The evaluation suite: a trained explainer beside the baselines, under several protocols.

`evaluate(workdir, ...)` reads the run's `config.json` and its latest checkpoint, computes every
method's maps on the held-out split (config.data.eval_split) in batches over all devices, scores
them under every protocol, and writes to the workdir (or `output_dir`):
- `results.json`: per method x protocol the mean, standard error and n of each score, and the
  method's seconds per image (map computation only, after the first batch's compilation);
- `results.md`: the same as Markdown tables (also printed);
- `per_image.npz`: every score of every image, f32[n] per '<method>/<protocol>/<score>' in the
  evaluation's image order (fixed by the split and --num_examples), with '_labels',
  '_predicted' and '_index' (each image's index in the held-out split) i32[n]: for paired
  comparisons across runs on the same images (`scripts/compare_runs.py`) and for merging the
  chunks of an evaluation run in parts (`chunk`, `scripts/merge_evaluations.py`);
- `curves.png`: mean deletion / insertion curves of each method under the paper's protocol;
- `examples.png`: one image per class (the first met, up to `num_figure_examples`) with each
  method's map.

Protocols (METHOD.md): 'paper' (pixels, 21 points, mean reference, softmax, predicted class),
'paper_label' (the same, ground-truth class), 'black' and 'blur' references, 'noise' (a fixed
field of uniform noise: a replacement the paper's training never uses, config.eval.
unseen_protocol), 'patch' (ranking
units of the ViT's patch size), 'rise' (deletion to the target's normalisation mean, i.e. zero in
its input space; insertion from a blur; one image row per step), and 'chefer' (positive /
negative perturbation, top-1 accuracy AUC x 100 against the clean prediction).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from l2r_jax import checks
from l2r_jax import explainer as explainer_lib
from l2r_jax import metrics
from l2r_jax import refine as refine_lib

Array = jax.Array
PROTOCOLS = ("paper", "paper_label", "black", "blur", "noise", "patch", "rise", "chefer")
L2R_METHODS = ("l2r", "l2r_refined")
# Every method but 'cam' (for heads that average-pool; Grad-CAM's equal on them). Signed IG is
# in: a different ranking from IG's absolute value, the best deleter under black on the demo.
DEFAULT_METHODS = ("l2r", "l2r_refined", "random", "gradient", "gradient_x_input",
                   "integrated_gradients", "integrated_gradients_signed", "smoothgrad", "gradcam",
                   "rollout", "rise")
DEFAULT_PROTOCOLS = ("paper", "paper_label", "black", "blur", "noise", "chefer")
# Scores where lower is better, for the table's arrows.
LOWER_IS_BETTER = {"deletion": True, "insertion": False, "pos": True, "neg": False}


def all_methods() -> tuple[str, ...]:
  from l2r_jax import baselines
  return L2R_METHODS + tuple(baselines.METHODS)


def protocols(config: Any, target: Any, names: Sequence[str]) -> dict[str, Any]:
  """The named protocols for `target`, with the run's mean colour and blur (config)."""
  for name in names:
    checks.choice(name, PROTOCOLS, "protocols")
  base = metrics.Protocol(reference=config.eval.reference, mean_color=tuple(config.mean_color),
                          blur_size=config.blur_size, blur_sigma=config.blur_sigma)
  patch = getattr(target.model, "patch_size", None)
  h, _ = target.input_size
  out = {}
  for name in names:
    if name == "paper":
      out[name] = base
    elif name == "paper_label":
      out[name] = dataclasses.replace(base, class_source="label")
    elif name in ("black", "blur", "noise"):
      out[name] = dataclasses.replace(base, reference=name)
    elif name == "patch":
      if patch is None:
        raise ValueError(f"protocol 'patch' ranks ViT patches; target {target.name!r} has none")
      out[name] = dataclasses.replace(base, unit=int(patch))
    elif name == "rise":
      out[name] = dataclasses.replace(base, reference="mean", mean_color=tuple(target.mean),
                                      insertion_reference="blur", num_steps=h + 1)
    else:
      out[name] = "chefer"
  return out


def refine_settings(config: Any, steps: int, learning_rate: float | None = None,
                    num_samples: int = 6, deletion_weight: float | None = None,
                    overrides: dict[str, Any] | None = None) -> refine_lib.RefineConfig:
  """Test-time refinement for the run of `config`: its references, mean colour and blur, and the
  finer half of its training grids (at most two; refinement sharpens what the single pass gives).

  learning_rate: None takes the run's `eval.refine_learning_rate`; a run written before that
  field existed gets RefineConfig's default (0.1), the rate it was evaluated with then.
  deletion_weight: the weight of the deletion AUC in the refinement loss (insertion's is 1);
  None takes the run's `eval.refine_deletion_weight`, 1 (the paper's loss) for a run without it.
  The run's `eval.refine_normalize_scores` and `eval.refine_scale` set how the sort sees the map
  (RefineConfig.scale); a run without them gets RefineConfig's (normalised scores, scale 1).
  overrides: RefineConfig fields to set last, {'tau': 0.1, 'grids': (7, 14),
  'objective.num_iters': 50, ...} (evaluate.py --refine_set); an unknown field is an error.
  """
  default = refine_lib.RefineConfig()
  if learning_rate is None:
    learning_rate = config.eval.get("refine_learning_rate", default.learning_rate)
  if deletion_weight is None:
    deletion_weight = config.eval.get("refine_deletion_weight",
                                      default.objective.deletion_weight)
  objective = dataclasses.replace(
      default.objective, deletion_weight=deletion_weight,
      normalize_scores=config.eval.get("refine_normalize_scores",
                                       default.objective.normalize_scores))
  settings = refine_lib.RefineConfig(
      steps=steps, learning_rate=learning_rate, num_samples=num_samples,
      grids=tuple(sorted(config.grids))[len(config.grids) // 2:][:2],
      references=tuple(config.references), mean_color=tuple(config.mean_color),
      blur_size=config.blur_size, blur_sigma=config.blur_sigma,
      scale=config.eval.get("refine_scale", default.scale), objective=objective)
  known = [f.name for f in dataclasses.fields(settings) if f.name != "objective"]
  known += [f"objective.{f.name}" for f in dataclasses.fields(settings.objective)]
  for field, value in (overrides or {}).items():
    if field not in known:
      raise ValueError(f"unknown refinement field {field!r} (--refine_set); the fields are "
                       f"{', '.join(known)}")
    value = tuple(value) if isinstance(value, list) else value
    owner, _, name = field.rpartition(".")
    if owner:
      settings = dataclasses.replace(
          settings, objective=dataclasses.replace(settings.objective, **{name: value}))
    else:
      settings = dataclasses.replace(settings, **{name: value})
  return settings


def load_run(workdir: str) -> tuple[Any, Any, Any, Any, Any]:
  """(config, target, model, params, backbone) of the training run in `workdir`: its
  config.json and the explainer params of its latest checkpoint (else explainer.msgpack)."""
  import ml_collections
  import orbax.checkpoint as ocp

  from l2r_jax import train
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{workdir!r} holds no config.json: it is not a training workdir; train "
                     f"first (python train.py --config ... --workdir {workdir}) or fix --workdir")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if not config.target.weights and config.target.pretrain_steps:
    cached = os.path.join(workdir, "target.msgpack")
    if not os.path.isfile(cached):
      raise ValueError(f"{workdir!r} lacks target.msgpack, the target its explainer was trained "
                       f"for; rerun train.py in it (it trains and caches the target)")
  target = train.build_target(config, workdir, log=lambda _: None)
  backbone = train.build_backbone(config)
  model = train.build_explainer(config, target)
  h, w = target.input_size
  tx = train.make_optimizer(train.learning_rate_fn(config.learning_rate, config.total_steps,
                                                   config.warmup_fraction),
                            config.weight_decay, config.clip_norm)
  state = train.create_train_state(model, jax.random.key(0), target, target.variables,
                                   jnp.zeros((1, h, w, 3)), jnp.zeros((1,), jnp.int32), tx,
                                   backbone, None if backbone is None else backbone.variables)
  template = state.params
  checkpoints = os.path.abspath(os.path.join(workdir, "checkpoints"))
  export = os.path.join(workdir, "explainer.msgpack")
  step = None
  if os.path.isdir(checkpoints):
    with ocp.CheckpointManager(checkpoints) as manager:
      step = manager.latest_step()
      if step is not None:
        # Restored onto this process's devices, whatever devices the run was trained on (a TPU
        # pod's checkpoint evaluated on one GPU or CPU).
        replicated = jax.sharding.NamedSharding(train.data_mesh(), jax.sharding.PartitionSpec())
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
        params = manager.restore(step, args=ocp.args.StandardRestore(abstract)).params
  if step is None:
    if not os.path.isfile(export):
      raise ValueError(f"{workdir!r} holds no checkpoint (checkpoints/) and no explainer.msgpack:"
                       f" train first (python train.py --workdir {workdir} ...)")
    params = train.load_explainer_params(export, template, what=repr(export))
  if jax.tree.structure(params) != jax.tree.structure(template):
    raise ValueError(f"the explainer params in {workdir!r} do not fit config.json's explainer")
  return config, target, model, params, backbone


def evaluate(workdir: str, *, methods: Sequence[str] = DEFAULT_METHODS,
             protocol_names: Sequence[str] = DEFAULT_PROTOCOLS, num_examples: int | None = None,
             batch_size: int | None = None, refine_steps: int = 10,
             refine_learning_rate: float | None = None, refine_samples: int = 6,
             refine_deletion_weight: float | None = None,
             refine_overrides: dict[str, Any] | None = None, baseline_options: Any = None,
             chunk: tuple[int, int] | None = None,
             overrides: dict[str, Any] | None = None, num_figure_examples: int = 4,
             output_dir: str | None = None, write: bool = True,
             verbose: bool = True) -> dict[str, Any]:
  """Evaluates the run in `workdir` (module docstring); returns what results.json holds.

  write: write results.json, results.md, per_image.npz and the figures into `output_dir`
  (default: the workdir); verbose: print the tables.

  chunk: (start, stop), evaluate only the images start..stop-1 of the num_examples-image draw
  (`sources.draw_chunk`), each with the random keys it has in the whole draw's evaluation; the
  chunks' per_image.npz files merge into that evaluation's table
  (scripts/merge_evaluations.py). An evaluation too long for one job runs as several.

  refine_learning_rate, refine_deletion_weight: None takes the run's (`refine_settings`);
  refine_overrides: RefineConfig fields to set (`refine_settings`).

  overrides: config fields of the run to change, {'eval.reference': 'black', ...}; an unknown
  field is an error.
  """
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  from tqdm import tqdm

  from l2r_jax import baselines
  from l2r_jax import data
  from l2r_jax import train
  from l2r_jax.data import sources

  known = all_methods()
  for m in methods:
    checks.choice(m, known, "methods")
  config, target, model, params, backbone = load_run(workdir)
  for field, value in (overrides or {}).items():
    node, *path = field.split(".")
    parent = config
    for part in [node, *path][:-1]:
      if part not in parent:
        raise ValueError(f"unknown config field {field!r} (--set); the run's fields are in "
                         f"{workdir}/config.json")
      parent = parent[part]
    if field.split(".")[-1] not in parent:
      raise ValueError(f"unknown config field {field!r} (--set); the run's fields are in "
                       f"{workdir}/config.json")
    parent[field.split(".")[-1]] = value
  if "rollout" in methods and getattr(target.model, "patch_size", None) is None:
    methods = [m for m in methods if m != "rollout"]
  methods = list(methods)  # attention rollout is for ViTs only
  chosen = protocols(config, target, protocol_names)
  refine_config = refine_settings(config, refine_steps, refine_learning_rate, refine_samples,
                                  refine_deletion_weight, refine_overrides)
  baseline_options = baseline_options or baselines.Options()
  mesh = train.data_mesh()
  batch_size = batch_size or config.eval.batch_size or config.batch_size
  # Fewer images per batch than devices (one process): each image's perturbed copies and
  # refinement samples are spread over the mesh instead of the images (metrics / refine `mesh`).
  rollout_mesh = mesh if batch_size < mesh.size and jax.process_count() == 1 else None
  sharding = NamedSharding(mesh, P(train.DATA_AXIS) if rollout_mesh is None else P())
  replicated = NamedSharding(mesh, P())
  target_variables = jax.device_put(target.variables, replicated)
  backbone_variables = None if backbone is None else jax.device_put(backbone.variables,
                                                                     replicated)
  params = jax.device_put(params, replicated)
  apply_fn = target.apply_fn(target_variables)

  split = train.source(config, config.data.eval_split)
  limit = config.eval.num_examples if num_examples is None else num_examples
  checks.static_int(limit, "num_examples", minimum=0)
  if chunk is None:
    source = sources.subsample(split, limit)
    positions = np.arange(len(source))  # each image's place in the draw: its random keys
  else:
    if len(chunk) != 2:
      raise ValueError(f"chunk must be (start, stop), got {chunk!r}")
    start, stop = (checks.static_int(v, "chunk's start and stop", minimum=0) for v in chunk)
    source, positions = sources.draw_chunk(split, limit, start, stop)
  # Each image's index in the held-out split, recorded beside its scores (per_image.npz).
  split_index = source.indices if source is not split else np.arange(len(split))
  batches = data.make_batches(source, batch_size=batch_size,
                              preprocess=train.preprocessing(config, target), num_epochs=1,
                              drop_remainder=False)

  @jax.jit
  def l2r_maps(params, images, classes):
    return explainer_lib.explain(model, params, target, target_variables, images, classes,
                                 backbone, backbone_variables)

  @jax.jit
  def refined_maps(maps, images, classes, key):
    return refine_lib.refine(apply_fn, images, maps, classes, key, refine_config,
                             mesh=rollout_mesh)[0]

  def maps_of(method, images, classes, key):
    if method == "l2r":
      return l2r_maps(params, images, classes)
    if method == "l2r_refined":
      return refined_maps(l2r_maps(params, images, classes), images, classes, key)
    return baselines.attribute(method, target, target_variables, images, classes, key=key,
                               options=baseline_options)

  @jax.jit
  def predict(images):
    return jnp.argmax(apply_fn(images), axis=-1).astype(jnp.int32)

  # One compiled scorer per protocol, shared by every method and batch.
  scorers = {}
  for name, protocol in chosen.items():
    if protocol == "chefer":
      scorers[name] = jax.jit(lambda images, maps, classes: metrics.perturbation_test(
          apply_fn, images, maps, classes, mean_color=tuple(config.mean_color),
          mesh=rollout_mesh))
    else:
      scorers[name] = jax.jit(lambda images, maps, classes, protocol=protocol:
                              metrics.deletion_insertion(apply_fn, images, maps,
                                                         protocol=protocol, classes=classes,
                                                         mesh=rollout_mesh))
  scores = metrics.Accumulator()
  # Each method's per-image difference to l2r on the same images (paired), for the standard
  # error of the gap; l2r goes first so that its scores are there when the others come.
  if "l2r" in methods:
    methods.insert(0, methods.pop(methods.index("l2r")))
  l2r_scores: dict[str, Array] = {}

  per_image: dict[str, list[np.ndarray]] = {"_labels": [], "_predicted": [], "_index": []}

  def add_scores(method, name, out, keys, mask, valid):
    """valid: the mask gathered to NumPy (the batch's real images, all processes)."""
    for k2 in keys:
      scores.add(f"{method}/{name}/{k2}", out[k2], mask)
      per_image.setdefault(f"{method}/{name}/{k2}", []).append(_gather(out[k2])[valid])
      if method == "l2r":
        l2r_scores[f"{name}/{k2}"] = out[k2]
      elif l2r_scores:
        scores.add(f"{method}/{name}/{k2}_minus_l2r", out[k2] - l2r_scores[f"{name}/{k2}"], mask)

  seconds = {m: 0.0 for m in methods}
  timed_images = {m: 0 for m in methods}
  # examples.png: the first image of each class met, up to num_figure_examples.
  figure: dict[str, list[np.ndarray]] = {k: [] for k in ("_images", "_labels", *methods)}
  key = jax.random.key(config.seed + 3)
  needs_label = any(p.class_source == "label" for p in chosen.values()
                    if isinstance(p, metrics.Protocol))
  advice = (f"lower the batch (evaluate.py --batch_size={max(batch_size // 2, 1)}, a multiple "
            f"of the {mesh.size} devices)")
  with tqdm(total=len(source), desc="evaluate", unit="image",
            disable=jax.process_index() != 0) as bar, checks.explain_out_of_memory(advice):
    for i, local in enumerate(batches):
      images = jax.make_array_from_process_local_data(sharding, local["image"])
      labels = jax.make_array_from_process_local_data(sharding, local["label"])
      mask = jax.make_array_from_process_local_data(sharding, local["mask"])
      index = jax.make_array_from_process_local_data(
          sharding, positions[local["index"]].astype(np.int32))
      where = jax.make_array_from_process_local_data(
          sharding, split_index[local["index"]].astype(np.int32))
      predicted = predict(images)
      valid = _gather(mask)
      per_image["_index"].append(_gather(where)[valid])
      per_image["_labels"].append(_gather(labels)[valid])
      per_image["_predicted"].append(_gather(predicted)[valid])
      class_sets = {"predicted": predicted}
      if needs_label:
        if int(jnp.min(jnp.where(mask, labels, 0))) < 0:
          raise ValueError("protocol 'paper_label' needs a label for every image; this source "
                           "has unlabeled images: drop 'paper_label' from --protocols")
        class_sets["label"] = jnp.where(mask, labels, predicted)
      picks = None
      if len(figure["_images"]) < num_figure_examples:
        all_labels = _gather(labels)
        picks = _figure_picks(figure, all_labels, _gather(mask), num_figure_examples)
        if picks is not None:
          figure["_images"].extend(_gather(images)[picks])
          figure["_labels"].extend(all_labels[picks])
      for method in methods:
        for class_source, classes in class_sets.items():
          k = method_key(key, method, index)
          t = time.perf_counter()
          maps = jax.block_until_ready(maps_of(method, images, classes, k))
          if class_source == "predicted" and (i > 0 or len(batches) == 1):
            seconds[method] += time.perf_counter() - t
            timed_images[method] += int(np.sum(local["mask"]))
          if picks is not None and class_source == "predicted":
            figure[method].extend(np.asarray(_gather(maps))[picks])
          for name, protocol in chosen.items():
            if protocol == "chefer":
              if class_source != "predicted":
                continue
              out = scorers[name](images, maps, predicted)
              add_scores(method, name, out, ("pos", "neg"), mask, valid)
              continue
            if protocol.class_source != class_source:
              continue
            out = scorers[name](images, maps, classes)
            add_scores(method, name, out, ("deletion", "insertion"), mask, valid)
            for k2 in ("deletion", "insertion"):
              if name == "paper":
                scores.add_curve(f"{method}/{k2}", out[f"{k2}_curve"], mask)
      bar.update(int(np.sum(local["mask"])) * jax.process_count())

  results: dict[str, Any] = {
      "workdir": workdir, "split": config.data.eval_split, "target": config.target.name,
      # Where the seconds per image were measured.
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
      # The images: the draw of num_examples (0: all of the split), or a chunk of it.
      "examples": {"num_examples": int(limit), "chunk": None if chunk is None else list(chunk),
                   "n": len(source)},
      "methods": {}, "protocols": {}}
  if "l2r_refined" in methods:  # what 'l2r_refined' ran with, as the protocols below
    results["refine"] = dataclasses.asdict(refine_config)
  for name, protocol in chosen.items():
    results["protocols"][name] = ("chefer" if protocol == "chefer"
                                  else dataclasses.asdict(protocol))
  for method in methods:
    row: dict[str, Any] = {"seconds_per_image": seconds[method] / max(timed_images[method], 1)}
    for name, protocol in chosen.items():
      keys = ("pos", "neg") if protocol == "chefer" else ("deletion", "insertion")
      row[name] = {k: scores.stats(f"{method}/{name}/{k}") for k in keys}
      if method != "l2r" and "l2r" in methods:
        row[name].update({f"{k}_minus_l2r": scores.stats(f"{method}/{name}/{k}_minus_l2r")
                          for k in keys})
    results["methods"][method] = row
  if "paper" in chosen:
    n = scores.total[f"{methods[0]}/paper/deletion_n"]
    results["curves"] = {m: {k: (scores.curves[f"{m}/{k}"] / n).tolist()
                             for k in ("deletion", "insertion")} for m in methods}
  table = markdown(results)
  if jax.process_index() == 0:
    if verbose:
      print(table)
    if write:
      out = output_dir or workdir
      os.makedirs(out, exist_ok=True)
      with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
      with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
      np.savez(os.path.join(out, "per_image.npz"),
               **{k: np.concatenate(v) for k, v in per_image.items()})
      if "curves" in results:
        plot_curves(results, os.path.join(out, "curves.png"))
      plot_examples(figure, methods, os.path.join(out, "examples.png"))
  return results


def _figure_picks(figure: dict[str, list], labels: np.ndarray, mask: np.ndarray,
                  wanted: int) -> np.ndarray | None:
  """Indices into this batch of the images examples.png still wants (valid, of a class not yet
  shown, unlabeled ones always; up to `wanted` in all), or None when it wants none."""
  shown = {int(c) for c in figure["_labels"] if c >= 0}
  picks = []
  for j, (label, valid) in enumerate(zip(labels.tolist(), mask.tolist())):
    if len(figure["_images"]) + len(picks) >= wanted:
      break
    if valid and label not in shown:
      if label >= 0:
        shown.add(label)
      picks.append(j)
  return np.asarray(picks, np.int64) if picks else None


def _method_seed(method: str) -> int:
  """A method's random stream (random ranking, RISE's masks, refinement's noise) as a function
  of its name alone, so that a method scores the same whichever other methods run beside it."""
  return zlib.crc32(method.encode()) & 0x7FFFFFFF


@functools.partial(jax.jit, static_argnums=1)  # jitted: `index` may span processes
def method_key(key: Array, method: str, index: Array) -> Array:
  """The PRNG key(s) of `method` for the images of a batch (their indices i32[B] in the
  evaluated set): RISE one key for the whole evaluation (its masks are shared by every image, as
  in the paper), the others one key per image from its index. Either way an image's map does not
  depend on the batch size, the batch it falls in or the process that loads it."""
  k = jax.random.fold_in(key, _method_seed(method))
  if method == "rise":
    return k
  return jax.vmap(functools.partial(jax.random.fold_in, k))(index)


def _gather(x: Array) -> np.ndarray:
  """The global array on every process (multi-host) as NumPy."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def markdown(results: dict[str, Any]) -> str:
  """results.json as Markdown: one table per protocol, mean +- standard error."""
  lines = [f"# Evaluation of {results['workdir']} ({results['target']}, split "
           f"{results['split']!r})", ""]
  examples = results.get("examples", {})
  chunk = examples.get("chunk")
  draw = examples.get("num_examples") or "all"
  parts = len(examples.get("parts", ()))
  merged = f"merged from {parts} part{'s' if parts != 1 else ''}"
  if chunk and parts:  # scripts/merge_evaluations.py: [[start, stop], ...]
    lines += [f"Images {', '.join(f'{a} to {b - 1}' for a, b in chunk)} of the draw of {draw}, "
              f"{merged}.", ""]
  elif chunk:
    lines += [f"Images {chunk[0]} to {chunk[1] - 1} of the draw of {draw} (a chunk: merge the "
              f"chunks' per_image.npz with scripts/merge_evaluations.py).", ""]
  elif parts:
    lines += [f"The whole draw of {draw}, {merged}.", ""]
  if "refine" in results:
    r = results["refine"]
    objective = r.get("objective", {})  # results.json of older runs may lack these fields
    sort = ("cell scores min-max normalised" if objective.get("normalize_scores", True)
            else f"scale {r.get('scale', 1.0):g} (scores not normalised)")
    lines += [f"l2r_refined: {r['steps']} steps of Adam at learning rate {r['learning_rate']:g}, "
              f"{r['num_samples']} samples per step on grids {tuple(r['grids'])}, tau "
              f"{r['tau']:g}, references {', '.join(r['references'])}, deletion weight "
              f"{objective.get('deletion_weight', 1.0):g}, {sort}.", ""]
  methods = results["methods"]
  paired = "l2r" in methods and len(methods) > 1
  for name in results["protocols"]:
    keys = [k for k in next(iter(methods.values()))[name] if not k.endswith("_minus_l2r")]
    n = next(iter(methods.values()))[name][keys[0]]["n"]
    lines.append(f"## {name} (n = {n})")
    lines.append("")
    heads = [f"{k} {'(lower is better)' if LOWER_IS_BETTER[k] else '(higher is better)'}"
             for k in keys]
    if paired:  # the paired per-image difference: its s.e. says whether a gap is real
      heads += [f"{k}: method - l2r" for k in keys]
    lines.append("| method | " + " | ".join(heads) + " | s / image |")
    lines.append("| --- | " + " | ".join("---" for _ in heads) + " | --- |")
    for method, row in methods.items():
      cells = [f"{row[name][k]['mean']:.4f} +- {row[name][k]['se']:.4f}" for k in keys]
      if paired:
        diffs = [row[name].get(f"{k}_minus_l2r") for k in keys]
        cells += ["" if d is None else f"{d['mean']:+.4f} +- {d['se']:.4f}" for d in diffs]
      lines.append(f"| {method} | " + " | ".join(cells) + f" | {row['seconds_per_image']:.4f} |")
    lines.append("")
  return "\n".join(lines)


def plot_curves(results: dict[str, Any], path: str) -> None:
  """Mean deletion and insertion curves of every method (paper protocol)."""
  from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it is
  fig = Figure(figsize=(10, 4))
  axes = fig.subplots(1, 2)
  steps = results["protocols"]["paper"]["num_steps"]
  x = np.linspace(0.0, 1.0, steps)
  for method, curves in results["curves"].items():
    for ax, k in zip(axes, ("deletion", "insertion")):
      auc = results["methods"][method]["paper"][k]["mean"]
      ax.plot(x, curves[k], label=f"{method} ({auc:.3f})")
  for ax, k in zip(axes, ("deletion", "insertion")):
    ax.set_title(f"{k} (paper protocol)")
    ax.set_xlabel("fraction of pixels " + ("removed" if k == "deletion" else "inserted"))
    ax.set_ylabel("probability of the class")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def overlay(ax: Any, image: np.ndarray, attribution: np.ndarray) -> None:
  """`attribution` f32[H, W] over the grey `image` f32[H, W, 3] on a matplotlib axis: jet colours
  between the map's 1st and 99th percentiles, so a few extreme pixels do not wash it out."""
  lo, hi = np.percentile(attribution, 1), np.percentile(attribution, 99)
  ax.imshow(np.clip(image, 0, 1).mean(-1), cmap="gray")
  ax.imshow(np.clip((attribution - lo) / max(hi - lo, 1e-12), 0, 1), cmap="jet", alpha=0.5)
  ax.axis("off")


def plot_examples(figure: dict[str, list[np.ndarray]], methods: Sequence[str], path: str) -> None:
  """A grid: each row an image (one per class), then each method's map over it."""
  from matplotlib.figure import Figure
  images = figure["_images"]
  rows, cols = len(images), 1 + len(methods)
  fig = Figure(figsize=(1.6 * cols, 1.6 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for r in range(rows):
    axes[r, 0].imshow(np.clip(images[r], 0, 1))
    axes[r, 0].axis("off")
    for c, method in enumerate(methods, start=1):
      overlay(axes[r, c], images[r], figure[method][r])
  for c, title in enumerate(["image", *methods]):
    axes[0, c].set_title(title, fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
