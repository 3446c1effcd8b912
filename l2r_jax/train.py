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
  references: tuple[str, ...] = perturb.REFERENCES  # one drawn uniformly per step
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
                       tx: optax.GradientTransformation) -> TrainState:
  """Step 0: the decoder's params initialised on example images, and the optimizer state."""
  params = explainer_lib.init(model, rng, target, target_variables, images, classes)
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
                     config: StepConfig) -> tuple[Array, dict[str, Array]]:
  """The loss of METHOD.md on one batch: two classes per image (top-1 and top-2 / label) from a
  clean target pass, the map of the top-1 class, and one target pass over all perturbed images.

  Args:
    batch: 'image' f32[B, H, W, 3] in [0, 1], 'label' i32[B].
    keys: PRNG keys[B], one per image (Gumbel noise).
  """
  images, labels = batch["image"], batch["label"]
  logits = jax.lax.stop_gradient(target.apply(target_variables, images))
  classes = objectives.select_classes(logits, labels)
  maps = explainer_lib.explain(model, params, target, target_variables, images, classes[:, 0])
  refs = reference_images(reference_index, images, config)
  frozen_target = target.apply_fn(jax.lax.stop_gradient(target_variables))
  loss, aux = objectives.loss_fn(frozen_target, images, maps, refs, classes, key=keys, grid=grid,
                                 tau=tau, config=config.objective)
  metrics = {"loss": loss, "deletion_auc": jnp.mean(aux["deletion_auc"]),
             "insertion_auc": jnp.mean(aux["insertion_auc"]), "peak_penalty": aux["peak_penalty"],
             "tau": tau}
  return loss, metrics


def make_train_step(mesh: Mesh, *, grid: int, model: explainer_lib.Explainer, target: Any,
                    tx: optax.GradientTransformation, config: StepConfig
                    ) -> Callable[[TrainState, Any, dict[str, Array], Array],
                                  tuple[TrainState, dict[str, Array]]]:
  """A jitted data-parallel step `(state, target_variables, batch, rng) -> (state, metrics)`.

  The batch is split over the mesh's 'data' axis, params and the target's variables are
  replicated, and the differentiated loss is the pmean over devices, i.e. the global batch mean. The reference and the Gumbel noise come from
  (rng, step) and the example's position in the global batch, so the result does not depend on
  the number of devices. `grid` is static: compile one step per grid size.
  """
  grid = checks.static_int(grid, "grid")

  def per_device(state, target_variables, batch, rng):
    step_key = jax.random.fold_in(rng, state.step)
    ref_key, noise_key = jax.random.split(step_key)
    reference_index = jax.random.randint(ref_key, (), 0, len(config.references))
    b = batch["image"].shape[0]
    positions = jax.lax.axis_index(DATA_AXIS) * b + jnp.arange(b)
    keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(positions)
    tau = temperature(state.step, config)

    def global_loss(params):
      loss, metrics = loss_and_metrics(params, target_variables, batch, keys, reference_index,
                                       tau, grid=grid, model=model, target=target, config=config)
      # The mean over the global batch. Differentiating it gives the global gradient directly:
      # params are replicated, so shard_map's autodiff already sums their cotangents over
      # devices (a pmean of the gradients on top would leave them device-count times too big).
      return jax.lax.pmean(loss, DATA_AXIS), metrics

    (_, metrics), grads = jax.value_and_grad(global_loss, has_aux=True)(state.params)
    metrics = jax.lax.pmean(metrics, DATA_AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), metrics

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS), P()),
                          out_specs=(P(), P()))
  return jax.jit(sharded)


def data_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process) with axis 'data'."""
  import numpy as np
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


# ----------------------------------------------------------------------------- the loop


def build_target(config: Any, workdir: str, log: Callable[[str], None] = print) -> Any:
  """The frozen target of config.target: its weights file, or (none given) trained on
  config.data and cached in the workdir."""
  import os

  from l2r_jax import data
  from l2r_jax import targets
  from l2r_jax import target_training
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  checks.choice(config.target.dtype, tuple(dtype), "config.target.dtype")
  if config.target.weights:
    target = targets.create(config.target.name, config.target.weights)
  else:
    target = targets.create(config.target.name, random_init=True)
    target = target_training.load_or_train(
        target, os.path.join(workdir, "target.msgpack"),
        source_train=data.create(config.data.source, root=config.data.root or None,
                                 split=config.data.train_split),
        source_test=data.create(config.data.source, root=config.data.root or None,
                                split=config.data.eval_split),
        steps=config.target.pretrain_steps, batch_size=config.target.pretrain_batch_size,
        learning_rate=config.target.pretrain_learning_rate, seed=config.seed, log=log)
  return target.with_dtype(dtype[config.target.dtype])


def step_config(config: Any) -> StepConfig:
  """The StepConfig of a ml_collections config."""
  o = config.objective
  return StepConfig(
      objective=objectives.ObjectiveConfig(num_fractions=o.num_fractions, num_iters=o.num_iters,
                                           smoothing_sigma=o.smoothing_sigma,
                                           peak_weight=o.peak_weight, peak_window=o.peak_window),
      references=tuple(config.references), mean_color=tuple(config.mean_color),
      blur_size=config.blur_size, blur_sigma=config.blur_sigma, tau_start=config.tau_start,
      tau_end=config.tau_end, total_steps=config.total_steps)


def train_and_evaluate(config: Any, workdir: str, stop_at: int | None = None) -> dict[str, Any]:
  """Trains the explainer of `config` in `workdir`, resuming from its latest checkpoint, and
  returns the final training metrics. Checkpoints (orbax, keep-N), `config.json`,
  `metrics.jsonl` and the explainer-only export `explainer.msgpack` are written to workdir.

  stop_at: stop after this step, as an interruption would (the schedules still span
  config.total_steps); rerunning resumes.
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
  log = tqdm.write
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  target = build_target(config, workdir, log)
  mesh = data_mesh()
  model = explainer_lib.Explainer(width=config.explainer.width,
                                  conditioning=config.explainer.conditioning,
                                  num_classes=target.num_classes)
  tx = make_optimizer(learning_rate_fn(config.learning_rate, config.total_steps,
                                       config.warmup_fraction),
                      config.weight_decay, config.clip_norm)
  cfg = step_config(config)
  source = data.create(config.data.source, root=config.data.root or None,
                       split=config.data.train_split)
  h, w = target.input_size
  example = jnp.zeros((1, h, w, 3), jnp.float32)
  state = create_train_state(model, jax.random.key(config.seed), target, target.variables,
                             example, jnp.zeros((1,), jnp.int32), tx)
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           save_interval_steps=config.checkpoint_every))
  # Replicated on every device from the start, as the step returns it: inputs with the same
  # shardings at every step mean one compilation per grid size.
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(state, replicated)
  target_variables = jax.device_put(target.variables, replicated)
  start = manager.latest_step() or 0
  if start:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
    log(f"resumed from the checkpoint of step {start} in {workdir}")
  batches = iter(data.make_batches(source, batch_size=config.batch_size,
                                   preprocess=target.preprocess, seed=config.seed, shuffle=True,
                                   num_epochs=None, drop_remainder=True, start_batch=start))
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  steps: dict[int, Callable] = {}
  rng = jax.random.key(config.seed + 1)
  metrics: dict[str, Any] = {}
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as jsonl, \
      tqdm(total=config.total_steps, initial=start, desc="train", unit="step") as bar:
    for step in range(start, min(config.total_steps, stop_at or config.total_steps)):
      grid = int(np.random.default_rng([config.seed, step]).choice(config.grids))
      if grid not in steps:
        steps[grid] = make_train_step(mesh, grid=grid, model=model, target=target, tx=tx,
                                      config=cfg)
      local = next(batches)
      batch = {k: jax.make_array_from_process_local_data(sharding, local[k])
               for k in ("image", "label")}
      state, metrics = steps[grid](state, target_variables, batch, rng)
      loss = float(metrics["loss"])
      if not np.isfinite(loss):
        manager.wait_until_finished()
        raise FloatingPointError(
            f"loss is {loss} at step {step + 1}; the last good checkpoint (step "
            f"{manager.latest_step()}) is kept in {workdir}")
      manager.save(step + 1, args=ocp.args.StandardSave(state))
      bar.update(1)
      if (step + 1) % config.log_every == 0 or step + 1 == config.total_steps:
        row = {"step": step + 1, "grid": grid, **{k: float(v) for k, v in metrics.items()}}
        jsonl.write(json.dumps(row) + "\n")
        jsonl.flush()
        bar.set_postfix(loss=f"{row['loss']:.4f}", deletion=f"{row['deletion_auc']:.3f}",
                        insertion=f"{row['insertion_auc']:.3f}")
  manager.wait_until_finished()
  manager.close()
  with open(os.path.join(workdir, "explainer.msgpack"), "wb") as f:
    f.write(serialization.to_bytes(jax.device_get(state.params)))
  return {"state": state, "target": target, "model": model,
          **{k: float(v) for k, v in metrics.items()}}
