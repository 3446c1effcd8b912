"""Training the explainer: train state, schedules, and the data-parallel step (METHOD.md 1-9).

Pure functions in the style of flax/examples/imagenet: `learning_rate_fn`, `temperature`,
`make_optimizer`, `create_train_state`, `loss_and_metrics`, and `make_train_step`, which wraps the
step in `shard_map` over a device mesh at the edge. The loop, checkpoints and logs live with the
CLI (issue 5).

Only the decoder's params are in the train state: the target's variables (and with them the
default backbone) are an argument of the step, enter every computation behind stop_gradient, and
never reach the optimizer, so they cannot change.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from l2r_jax import checks
from l2r_jax import explainer as explainer_lib
from l2r_jax import objectives
from l2r_jax import perturb

Array = jax.Array
DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What a training step needs besides params and data; defaults are the paper's."""
  objective: objectives.ObjectiveConfig = objectives.ObjectiveConfig()
  references: tuple[str, ...] = perturb.PAPER_REFERENCES  # one drawn uniformly per step
  mean_color: tuple[float, ...] = perturb.IMAGENET_MEAN
  blur_size: int = 37
  blur_sigma: float = 37.0
  tau_start: float = 1.0
  tau_end: float = 0.3
  total_steps: int = 1000

  def __post_init__(self):
    for r in self.references:
      checks.choice(r, perturb.REFERENCES, "references")
    if not self.references:
      raise ValueError("references must name at least one of " + str(perturb.REFERENCES))
    checks.static_int(self.total_steps, "total_steps")


@struct.dataclass
class TrainState:
  step: Array  # i32[]
  params: Any
  opt_state: Any


def learning_rate_fn(base_lr: float, total_steps: int,
                     warmup_fraction: float = 0.06) -> optax.Schedule:
  """Linear warm-up from base_lr / 25 over `warmup_fraction` of the steps, then cosine decay to
  base_lr / 25 / 1e4 (METHOD.md, item 9)."""
  warmup = max(1, round(warmup_fraction * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=base_lr / 25, peak_value=base_lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=base_lr / 25 / 1e4)


def temperature(step: Array, config: StepConfig) -> Array:
  """Sinkhorn temperature, linear from tau_start to tau_end over the run."""
  frac = jnp.clip(step / max(1, config.total_steps - 1), 0.0, 1.0)
  return config.tau_start + (config.tau_end - config.tau_start) * frac


def make_optimizer(learning_rate: float | optax.Schedule, weight_decay: float = 1e-3,
                   clip_norm: float = 1.0) -> optax.GradientTransformation:
  """Grad-norm clipping, then AdamW (METHOD.md: clip 1.0, weight decay 1e-3)."""
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(learning_rate, weight_decay=weight_decay))


def create_train_state(model: explainer_lib.Explainer, rng: Array, target: Any,
                       target_variables: Any, images: Array, classes: Array,
                       tx: optax.GradientTransformation, backbone: Any = None,
                       backbone_variables: Any = None) -> TrainState:
  """Step 0: the decoder's params initialised on example images, and the optimizer state."""
  params = explainer_lib.init(model, rng, target, target_variables, images, classes, backbone,
                              backbone_variables)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def reference_images(index: Array, images: Array, config: StepConfig) -> Array:
  """The references of config.references[index] (index traced): f32[B, H, W, C]."""
  kw = dict(mean_color=config.mean_color, blur_size=config.blur_size,
            blur_sigma=config.blur_sigma)
  branches = [lambda x, r=r: perturb.reference_images(x, r, **kw) for r in config.references]
  return jax.lax.switch(index, branches, images)


def loss_and_metrics(params: Any, target_variables: Any, batch: dict[str, Array], keys: Array,
                     reference_index: Array, tau: Array, *, grid: int,
                     model: explainer_lib.Explainer, target: Any,
                     config: StepConfig, backbone: Any = None,
                     backbone_variables: Any = None) -> tuple[Array, dict[str, Array]]:
  """The loss of METHOD.md on one batch: two classes per image (top-1 and top-2 / label) from a
  clean target pass, the map of the top-1 class, and one target pass over all perturbed images.

  Args:
    batch: 'image' f32[B, H, W, 3] in [0, 1], 'label' i32[B].
    keys: PRNG keys[B], one per image (Gumbel noise).
    backbone, backbone_variables: a separate frozen feature extractor (default: the target).
  """
  images, labels = batch["image"], batch["label"]
  logits = jax.lax.stop_gradient(target.apply(target_variables, images))
  classes = objectives.select_classes(logits, labels)
  maps = explainer_lib.explain(model, params, target, target_variables, images, classes[:, 0],
                               backbone, backbone_variables)
  refs = reference_images(reference_index, images, config)
  frozen_target = target.apply_fn(jax.lax.stop_gradient(target_variables))
  loss, aux = objectives.loss_fn(frozen_target, images, maps, refs, classes, key=keys, grid=grid,
                                 tau=tau, config=config.objective)
  # The AUCs as the loss weighs them (objective.second_class_weight), so that the logged loss is
  # deletion_weight * deletion + (1 - insertion) + peak_weight * peak_penalty.
  metrics = {"loss": loss,
             "deletion_auc": objectives.class_mean(aux["deletion_auc"], config.objective),
             "insertion_auc": objectives.class_mean(aux["insertion_auc"], config.objective),
             "peak_penalty": aux["peak_penalty"], "tau": tau}
  return loss, metrics


def make_train_step(mesh: Mesh, *, grid: int, model: explainer_lib.Explainer, target: Any,
                    tx: optax.GradientTransformation, config: StepConfig, backbone: Any = None
                    ) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
  """A jitted data-parallel step
  `(state, target_variables, batch, rng, backbone_variables=None) -> (state, metrics)`.

  The batch is split over the mesh's 'data' axis, params and the target's variables are
  replicated, and the differentiated loss is the pmean over devices, i.e. the global batch mean.
  The reference and the Gumbel noise come from
  (rng, step) and the example's position in the global batch, so the result does not depend on
  the number of devices. `grid` is static: compile one step per grid size. Besides the loss terms,
  metrics hold 'grad_norm' and 'finite' (1.0 when every updated param is finite), so a diverging
  run is caught before its state is saved.
  """
  grid = checks.static_int(grid, "grid")

  def per_device(state, target_variables, batch, rng, backbone_variables):
    step_key = jax.random.fold_in(rng, state.step)
    ref_key, noise_key = jax.random.split(step_key)
    reference_index = jax.random.randint(ref_key, (), 0, len(config.references))
    b = batch["image"].shape[0]
    positions = jax.lax.axis_index(DATA_AXIS) * b + jnp.arange(b)
    keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(positions)
    tau = temperature(state.step, config)

    def global_loss(params):
      loss, metrics = loss_and_metrics(params, target_variables, batch, keys, reference_index,
                                       tau, grid=grid, model=model, target=target, config=config,
                                       backbone=backbone, backbone_variables=backbone_variables)
      # The mean over the global batch. Differentiating it gives the global gradient directly:
      # params are replicated, so shard_map's autodiff already sums their cotangents over
      # devices (a pmean of the gradients on top would leave them device-count times too big).
      return jax.lax.pmean(loss, DATA_AXIS), metrics

    (_, metrics), grads = jax.value_and_grad(global_loss, has_aux=True)(state.params)
    metrics = jax.lax.pmean(metrics, DATA_AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["finite"] = jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])).astype(jnp.float32)
    return TrainState(state.step + 1, params, opt_state), metrics

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS), P(), P()),
                          out_specs=(P(), P()))
  step = jax.jit(sharded)

  def train_step(state, target_variables, batch, rng, backbone_variables=None):
    return step(state, target_variables, batch, rng, backbone_variables)

  return train_step


def data_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process) with axis 'data'."""
  import numpy as np
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


# ----------------------------------------------------------------------------- the loop


def build_target(config: Any, workdir: str, log: Callable[[str], None] = print) -> Any:
  """The frozen target of config.target: its weights file, or (none given and
  config.target.pretrain_steps > 0) trained on config.data and cached in the workdir.

  With several processes only process 0 trains (or loads) and caches the pretrained target, and
  the others receive its variables: the same training is not bit-identical everywhere (XLA's
  CPU results change with its threading and the process's device count, GPU autotuning picks
  per host), and the replicated target must be one value (device_put checks it across
  processes), written to the shared cache by one process.
  """
  import os

  from l2r_jax import targets
  from l2r_jax import target_training
  checks.choice(config.target.dtype, tuple(DTYPES), "config.target.dtype")
  if config.target.weights or not config.target.pretrain_steps:
    # Without a file this raises, naming config.target.weights.
    target = targets.create(config.target.name, config.target.weights or None)
  else:
    target = targets.create(config.target.name, random_init=True)
    if jax.process_index() == 0:
      target = target_training.load_or_train(
          target, os.path.join(workdir, "target.msgpack"),
          source_train=source(config, config.data.train_split),
          source_test=source(config, config.data.eval_split),
          steps=config.target.pretrain_steps, batch_size=config.target.pretrain_batch_size,
          learning_rate=config.target.pretrain_learning_rate, seed=config.seed, log=log)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      from orbax.checkpoint import multihost
      # The others wait for process 0 at a barrier of the coordination service, not in the
      # broadcast: a first CPU collective (gloo) gives up when a process is 30 s late.
      multihost.get_barrier_sync_fn()(key=f"l2r_jax_target_{next(_BARRIERS)}",
                                      timeout_ms=PRETRAIN_TIMEOUT_S * 1000)
      target = dataclasses.replace(
          target, variables=multihost_utils.broadcast_one_to_all(target.variables))
  return target.with_dtype(DTYPES[config.target.dtype])


def load_explainer_params(path: str, template: Any, what: str | None = None) -> Any:
  """The explainer params of a training workdir's explainer.msgpack (or that file itself),
  checked leaf by leaf against `template` (this config's fresh params). `what` names the file
  in errors (default: as config.init_from, the flag that points at it)."""
  import os

  import numpy as np
  from flax import serialization
  what = what or f"config.init_from={path!r}"
  file = os.path.join(path, "explainer.msgpack") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise ValueError(f"{what}: no such file {file!r}; set --config.init_from to a finished "
                     f"training workdir or its explainer.msgpack")
  with open(file, "rb") as f:
    state_dict = serialization.msgpack_restore(f.read())
  want = serialization.to_state_dict(template)
  mismatch = (jax.tree.structure(state_dict) != jax.tree.structure(want) or any(
      np.shape(a) != np.shape(b)
      for a, b in zip(jax.tree.leaves(state_dict), jax.tree.leaves(want))))
  if mismatch:
    raise ValueError(f"{what}: its explainer does not fit this config's "
                     f"(explainer width, conditioning, class_evidence, target): expected params "
                     f"{jax.tree.map(np.shape, want)}, the file holds "
                     f"{jax.tree.map(np.shape, state_dict)}")
  return jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype),
                      serialization.from_state_dict(template, state_dict), template)


PRETRAIN_TIMEOUT_S = 24 * 3600  # how long the other processes wait for process 0's pretraining
# Barrier names must not repeat; every process makes the same calls, so the same numbers.
_BARRIERS = itertools.count()


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_backbone(config: Any) -> Any:
  """The separate frozen backbone of config.explainer.backbone (a registered target name with its
  weights file config.explainer.backbone_weights), or None: the target's own features."""
  from l2r_jax import targets
  name = config.explainer.get("backbone", "")
  if not name:
    return None
  return targets.create(name, config.explainer.backbone_weights or None,
                        dtype=DTYPES[config.target.dtype])


def build_explainer(config: Any, target: Any) -> explainer_lib.Explainer:
  """The explainer of config.explainer for `target` (configs written before an option existed
  get its old behaviour)."""
  return explainer_lib.Explainer(width=config.explainer.width,
                                 conditioning=config.explainer.conditioning,
                                 num_classes=target.num_classes,
                                 class_evidence=bool(config.explainer.get("class_evidence",
                                                                          False)))


PREPROCESSINGS = ("target", "resize")


def preprocessing(config: Any, target: Any) -> Any:
  """Raw image -> f32[*input_size, 3]: the target's own resize / crop ('target') or the paper's
  plain resize to the input size ('resize'), per config.data.preprocess."""
  from l2r_jax import data
  checks.choice(config.data.preprocess, PREPROCESSINGS, "config.data.preprocess")
  if config.data.preprocess == "target":
    return target.preprocess
  return data.resize_to(tuple(target.input_size))


def source(config: Any, split: str) -> Any:
  """The data source of config.data for `split` (config.data.train_split / eval_split)."""
  from l2r_jax import data
  kwargs = dict(config.data.get("options", {}) or {})
  if config.data.source == "tfds":
    kwargs.update(builder=config.data.builder or None, data_dir=config.data.data_dir or None,
                  manual_dir=config.data.manual_dir or None)
  return data.create(config.data.source, root=config.data.root or None, split=split, **kwargs)


def step_config(config: Any) -> StepConfig:
  """The StepConfig of a ml_collections config."""
  o = config.objective
  return StepConfig(
      objective=objectives.ObjectiveConfig(num_fractions=o.num_fractions, num_iters=o.num_iters,
                                           smoothing_sigma=o.smoothing_sigma,
                                           peak_weight=o.peak_weight, peak_window=o.peak_window,
                                           # absent from the config.json of older runs
                                           deletion_weight=o.get("deletion_weight", 1.0),
                                           second_class_weight=o.get("second_class_weight",
                                                                     1.0),
                                           straight_through=bool(o.get("straight_through",
                                                                       False))),
      references=tuple(config.references), mean_color=tuple(config.mean_color),
      blur_size=config.blur_size, blur_sigma=config.blur_sigma, tau_start=config.tau_start,
      tau_end=config.tau_end, total_steps=config.total_steps)


def heldout_protocol(config: Any) -> Any:
  """The paper's deletion / insertion protocol (METHOD.md), with the config's mean colour and
  blur: what the final evaluation of a training run measures."""
  from l2r_jax import metrics
  return metrics.Protocol(reference=config.eval.reference, mean_color=tuple(config.mean_color),
                          blur_size=config.blur_size, blur_sigma=config.blur_sigma)


def evaluate_heldout(config: Any, params: Any, target: Any, target_variables: Any,
                     model: explainer_lib.Explainer, mesh: Mesh, backbone: Any = None,
                     backbone_variables: Any = None) -> dict[str, Any]:
  """Deletion and insertion AUC (hard ranking, `heldout_protocol`, predicted class) of the
  explainer's maps and of random rankings on config.data.eval_split (a fixed sample of
  config.eval.num_examples of it spread over the split, `sources.subsample`; 0 = all), batched
  over `mesh`.

  Returns {'n', 'explainer': {...}, 'random': {...}} with per-method 'deletion', 'insertion' and
  their standard errors 'deletion_se', 'insertion_se'. Padding examples (mask False) are not
  counted; every process gets the same numbers.
  """
  from jax.sharding import NamedSharding

  from l2r_jax import data
  from l2r_jax import metrics
  from l2r_jax.data import sources

  examples = sources.subsample(source(config, config.data.eval_split), config.eval.num_examples)
  protocol = heldout_protocol(config)
  batch_size = config.eval.batch_size or config.batch_size
  sharding = NamedSharding(mesh, P(DATA_AXIS))

  @jax.jit
  def aucs(params, target_variables, backbone_variables, images, key):
    apply_fn = target.apply_fn(target_variables)
    classes = jnp.argmax(apply_fn(images), axis=-1).astype(jnp.int32)
    maps = {"explainer": explainer_lib.explain(model, params, target, target_variables, images,
                                               classes, backbone, backbone_variables),
            "random": jax.random.uniform(key, images.shape[:3])}
    return {method: metrics.deletion_insertion(apply_fn, images, m, protocol=protocol,
                                               classes=classes) for method, m in maps.items()}

  scores = metrics.Accumulator()
  batches = data.make_batches(examples, batch_size=batch_size,
                              preprocess=preprocessing(config, target), num_epochs=1,
                              drop_remainder=False)
  key = jax.random.key(config.seed + 2)
  advice = (f"lower the evaluation batch (train.py --config.eval.batch_size="
            f"{max(batch_size // 2, 1)}); the training checkpoints are kept, rerun to evaluate")
  for i, local in enumerate(batches):
    images, mask = (jax.make_array_from_process_local_data(sharding, local[k])
                    for k in ("image", "mask"))
    with checks.explain_out_of_memory(advice):
      out = aucs(params, target_variables, backbone_variables, images,
                 jax.random.fold_in(key, i))
    for method, values in out.items():
      for k in ("deletion", "insertion"):
        scores.add(f"{method}/{k}", values[k], mask)
  result: dict[str, Any] = {"n": scores.stats("explainer/deletion")["n"],
                            "split": config.data.eval_split,
                            "protocol": dataclasses.asdict(protocol)}
  for method in ("explainer", "random"):
    row = {}
    for k in ("deletion", "insertion"):
      stats = scores.stats(f"{method}/{k}")
      row[k], row[f"{k}_se"] = stats["mean"], stats["se"]
    result[method] = row
  return result


class Logger:
  """Training scalars to `metrics.jsonl` and TensorBoard event files in workdir (process 0 only;
  tensorboardX writes the event files: TensorBoard without TensorFlow)."""

  def __init__(self, workdir: str):
    import os
    self.active = jax.process_index() == 0
    if self.active:
      from tensorboardX import SummaryWriter
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
    import json
    if not self.active:
      return
    self.jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
    self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(f"{prefix}/{k}", v, step)
    self.tb.flush()

  def close(self) -> None:
    if self.active:
      self.jsonl.close()
      self.tb.close()


def train_and_evaluate(config: Any, workdir: str, stop_at: int | None = None) -> dict[str, Any]:
  """Trains the explainer of `config` in `workdir`, resuming from its latest checkpoint, then
  evaluates it on the held-out split (`evaluate_heldout`).

  Written to workdir: orbax checkpoints (keep-N), `config.json`, `metrics.jsonl` and TensorBoard
  event files (`tensorboard/`), the explainer-only export `explainer.msgpack`, and the held-out
  results `eval.json`. Returns {'state', 'target', 'model', 'eval', **last training metrics}.

  stop_at: stop after this step, as an interruption would (the schedules still span
  config.total_steps; no export, no evaluation); rerunning resumes.
  """
  import json
  import os

  import numpy as np
  import orbax.checkpoint as ocp
  from flax import serialization
  from jax.sharding import NamedSharding
  from tqdm import tqdm

  from l2r_jax import data

  os.makedirs(workdir, exist_ok=True)
  log = tqdm.write if jax.process_index() == 0 else (lambda _: None)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  target = build_target(config, workdir, log)
  backbone = build_backbone(config)
  mesh = data_mesh()
  model = build_explainer(config, target)
  tx = make_optimizer(learning_rate_fn(config.learning_rate, config.total_steps,
                                       config.warmup_fraction),
                      config.weight_decay, config.clip_norm)
  cfg = step_config(config)
  examples = source(config, config.data.train_split)
  h, w = target.input_size
  # Replicated on every device from the start, as the step returns it: inputs with the same
  # shardings at every step mean one compilation per grid size.
  replicated = NamedSharding(mesh, P())
  target_variables = jax.device_put(target.variables, replicated)
  backbone_variables = None if backbone is None else jax.device_put(backbone.variables, replicated)
  state = create_train_state(model, jax.random.key(config.seed), target, target_variables,
                             jnp.zeros((1, h, w, 3), jnp.float32), jnp.zeros((1,), jnp.int32), tx,
                             backbone, backbone_variables)
  state = jax.device_put(state, replicated)
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           save_interval_steps=config.checkpoint_every))
  start = manager.latest_step() or 0
  if not start and config.get("init_from", ""):
    params = jax.device_put(load_explainer_params(config.init_from, state.params), replicated)
    state = state.replace(params=params, opt_state=jax.jit(tx.init)(params))
    log(f"the explainer starts from {config.init_from}")
  if start:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
    log(f"resumed from the checkpoint of step {start} in {workdir}")
  augment = data.Augment(size=tuple(target.input_size)) if config.data.augment else None
  batches = iter(data.make_batches(examples, batch_size=config.batch_size,
                                   preprocess=preprocessing(config, target), augment=augment,
                                   seed=config.seed, shuffle=True, num_epochs=None,
                                   drop_remainder=True, start_batch=start))
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  steps: dict[int, Callable] = {}
  rng = jax.random.key(config.seed + 1)
  metrics: dict[str, Any] = {}
  end = min(config.total_steps, stop_at or config.total_steps)
  logger = Logger(workdir)
  advice = (f"lower the batch (train.py --config.batch_size={max(config.batch_size // 2, 1)}; "
            f"it must stay a multiple of the {mesh.size} devices), the finest grid "
            f"(--config.grids) or the target's precision (--config.target.dtype=bfloat16)")
  done, good = start, state  # the steps in `good`, the last state checked finite
  # The last step dispatched and not yet checked: (step, its new state, its metrics, grid). A
  # step is checked, saved and logged only once the next one is queued behind it, so the device
  # never waits for the host between steps (reading the loss blocks until the step is done).
  pending = None

  def finite(metrics) -> tuple[float, bool]:
    """(loss, whether the params are finite) of a step's metrics: waits for that step."""
    with checks.explain_out_of_memory(advice):
      return float(metrics["loss"]), float(metrics["finite"]) == 1.0

  def check(pending, bar) -> None:
    nonlocal done, good
    step, new_state, metrics, grid = pending
    loss, params_finite = finite(metrics)
    if not (np.isfinite(loss) and params_finite):
      manager.wait_until_finished()
      raise FloatingPointError(
          f"training diverged at step {step + 1} (loss {loss}, "
          f"{'finite' if params_finite else 'non-finite'} params); the last good checkpoint "
          f"(step {manager.latest_step()}) is kept in {workdir}. Lower "
          f"--config.learning_rate or raise --config.objective.smoothing_sigma, then rerun")
    good, done = new_state, step + 1
    # The last step is always kept, whatever config.checkpoint_every: a rerun of a finished (or
    # stop_at) run must not train its tail again.
    manager.save(step + 1, args=ocp.args.StandardSave(good), force=step + 1 == end)
    if (step + 1) % config.log_every == 0 or step + 1 == config.total_steps:
      scalars = {"grid": float(grid), **{k: float(v) for k, v in metrics.items()},
                 "steps_per_second": bar.format_dict["rate"] or 0.0}
      logger.write(step + 1, scalars)
      bar.set_postfix(loss=f"{scalars['loss']:.4f}", deletion=f"{scalars['deletion_auc']:.3f}",
                      insertion=f"{scalars['insertion_auc']:.3f}")

  try:
    try:
      with tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
                disable=jax.process_index() != 0) as bar:
        for step in range(start, end):
          grid = int(np.random.default_rng([config.seed, step]).choice(config.grids))
          if grid not in steps:
            steps[grid] = make_train_step(mesh, grid=grid, model=model, target=target, tx=tx,
                                          config=cfg, backbone=backbone)
          local = next(batches)
          batch = {k: jax.make_array_from_process_local_data(sharding, local[k])
                   for k in ("image", "label")}
          with checks.explain_out_of_memory(advice):
            state, metrics = steps[grid](state, target_variables, batch, rng, backbone_variables)
          if pending is not None:
            check(pending, bar)
          pending = (step, state, metrics, grid)
          bar.update(1)
        if pending is not None:
          check(pending, bar)
          pending = None
    except KeyboardInterrupt:
      # Ctrl-C: keep every finished step (the last dispatched one too, once checked finite).
      # With several processes the save would be a collective that the others may never join,
      # so there the periodic checkpoints are what is kept.
      if pending is not None and pending[0] + 1 > done:
        loss, params_finite = finite(pending[2])
        if np.isfinite(loss) and params_finite:
          good, done = pending[1], pending[0] + 1
      if jax.process_count() == 1 and done > (manager.latest_step() or 0):
        manager.save(done, args=ocp.args.StandardSave(good), force=True)
      manager.wait_until_finished()
      log(f"interrupted after step {done}; the checkpoint of step {manager.latest_step()} is in "
          f"{workdir}: rerun the same command to resume from it")
      raise
    state = good
    manager.wait_until_finished()
    result = {"state": state, "target": target, "model": model,
              **{k: float(v) for k, v in metrics.items()}}
    if end < config.total_steps:
      return result
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "explainer.msgpack"), "wb") as f:
        f.write(serialization.to_bytes(jax.device_get(state.params)))
    result["eval"] = evaluate_heldout(config, state.params, target, target_variables, model, mesh,
                                      backbone, backbone_variables)
    e = result["eval"]
    log(f"held-out ({e['n']} images of {config.data.eval_split!r}, {config.eval.reference} "
        f"reference): deletion AUC {e['explainer']['deletion']:.4f} +- "
        f"{e['explainer']['deletion_se']:.4f} (random ranking {e['random']['deletion']:.4f}), "
        f"insertion AUC {e['explainer']['insertion']:.4f} +- "
        f"{e['explainer']['insertion_se']:.4f} (random {e['random']['insertion']:.4f})")
    logger.write(config.total_steps, {f"{m}_{k}": v for m in ("explainer", "random")
                                      for k, v in e[m].items()}, prefix="eval")
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(e, f, indent=1)
    return result
  finally:
    logger.close()
    manager.close()
