"""What every trainer shares: base config fields, mesh + data + writer setup, and the run."""

import dataclasses
import os
from typing import Any, Callable

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
import optax

from agriclip_jax import config_lib
from agriclip_jax import metrics as metrics_lib
from agriclip_jax import optim
from agriclip_jax import sharding
from agriclip_jax.evaluators import base as evaluators
from agriclip_jax.input import datasets
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess
from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.trainers import loop as loop_lib
from agriclip_jax.trainers import state as state_lib


def base_config() -> ml_collections.ConfigDict:
  """Fields every trainer reads, with defaults."""
  config = ml_collections.ConfigDict()
  config.trainer = ""
  config.seed = 0
  config.total_steps = 1000
  config.log_every = 50
  config.eval_every = 500  # Evaluators run at these steps and always at the last step.
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  config.mesh = [("data", -1), ("fsdp", 1)]
  config.sharding_rules = [(".*", "fsdp")]
  config.fsdp_min_size = 2**14
  config.input = dict(
      dataset="agri_synthetic",
      split="train",
      data_dir="",  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
      batch_size=256,  # Global: split over all devices of all processes.
      image_size=224,
      image_key="image",
      text_key="captions",
      label_key="label",
      crop_scale=(0.5, 1.0),
      flip=True,
      mean=preprocess.CLIP_MEAN,
      std=preprocess.CLIP_STD,
      num_threads=8,
      worker_count=0,  # >0: decode in that many worker processes.
  )
  config.optim = dict(
      name="adamw", lr=1e-3, schedule="cosine", warmup_steps=0, end_lr_factor=0.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, decay_regex=".*/kernel",
      clip_norm=1.0, rules=[(".*", {})])
  config.evals = ml_collections.ConfigDict()
  config.eval_batch_size = 0  # 0 = input.batch_size
  config.init = dict(
      workdir="",  # Copy parameters from this run's latest checkpoint ({workdir} allowed).
      config="",  # If that run has no checkpoint yet, train it first with this config.
      params=".*",  # Regex: which of its parameters to copy...
      skip="",  # ...and which not.
  )
  return config


def finished(config, workdir: str) -> dict[str, Any] | None:
  summary = loop_lib.finished_summary(workdir, config.total_steps)
  if summary is not None:
    logging.info("%s already finished at step %d; nothing to do.", workdir, summary["step"])
  return summary


def run_init_stage(config, workdir: str) -> None:
  """Trains the run `config.init` copies from, if this run has not started and it is needed."""
  if not config.init.config or state_lib.latest_step(os.path.join(workdir, "checkpoints")):
    return
  from agriclip_jax import trainers  # pylint: disable=g-import-not-at-top  (cycle)
  stage_workdir = config_lib.expand_path(config.init.workdir, workdir)
  logging.info("Preparing config.init: %s -> %s", config.init.config, stage_workdir)
  trainers.run(config_lib.load(config.init.config), stage_workdir)


def train_step(objective: Callable, tx, labels: dict[str, str], lr_schedule: Callable):
  """A step function from `objective(params, batch, rng) -> (loss, metrics)`.

  Gradients are taken with respect to the trainable parameters only, so nothing is computed
  for frozen towers' backward passes and they pass through the step unchanged.
  """

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    trainable, frozen = optim.split(state["params"], labels)
    grad_fn = jax.value_and_grad(
        lambda t: objective(optim.merge(t, frozen), batch, rng), has_aux=True)
    (loss, metrics), grads = grad_fn(trainable)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=lr_schedule(state["step"]))
    return dict(state, step=state["step"] + 1, opt_state=opt_state,
                params=optim.merge(trainable, frozen)), metrics

  return step


def make_tokenizer(config, builder, source) -> tokenizer_lib.Tokenizer:
  if config.tokenizer.path:
    return tokenizer_lib.from_pretrained(os.path.expanduser(config.tokenizer.path),
                                         config.tokenizer.max_len)
  return tokenizer_lib.trained_on_dataset(
      source, os.fspath(builder.data_dir), config.tokenizer.vocab_size,
      config.tokenizer.max_len, config.input.text_key, config.tokenizer.max_examples)


@dataclasses.dataclass
class Setup:
  """Mesh, training data and metric writer of a run."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  batch_sharding: jax.sharding.NamedSharding
  train_builder: Any
  train_source: Any
  writer: metrics_lib.Writer

  @classmethod
  def create(cls, config, workdir: str) -> "Setup":
    run_init_stage(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    sharding.batch_size_per_shard(mesh, config.input.batch_size)
    builder = datasets.builder(config.input.dataset, config.input.data_dir or None)
    source = datasets.data_source(builder, config.input.split)
    writer = metrics_lib.Writer(workdir)
    writer.hparams(flax.traverse_util.flatten_dict(config.to_dict(), sep="."))
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))
    logging.info("Mesh %s over %d devices in %d processes; %d training examples",
                 dict(mesh.shape), jax.device_count(), jax.process_count(), len(source))
    return cls(config, workdir, mesh, sharding.batch_sharding(mesh), builder, source, writer)

  def state_spec(self, model_init: Callable[[jax.Array], Any]):
    """(StateSpec, optimizer, lr schedule) for a model, per `config.optim`."""
    config = self.config
    params_shape = jax.eval_shape(model_init, jax.random.key(0))
    tx, labels, lr_schedule = optim.make(config.optim, params_shape, config.total_steps)
    spec = state_lib.make_spec(model_init, tx, labels, self.mesh, config.sharding_rules,
                               config.seed, config.fsdp_min_size)
    sizes = {path: int(np.prod(x.shape)) for path, x in optim.flatten(params_shape).items()}
    frozen = sum(n for path, n in sizes.items() if labels[path] == optim.FROZEN)
    logging.info("Parameters: %s total, %s trainable, %s frozen", f"{sum(sizes.values()):,}",
                 f"{sum(sizes.values()) - frozen:,}", f"{frozen:,}")
    return spec, tx, lr_schedule

  def run(self, spec, objective, tx, lr_schedule, transform, encode_images,
          encode_texts=None, tokenizer=None) -> dict[str, Any]:
    """Compiles the step, builds the data iterator and evaluators, and runs the loop."""
    config, replicated = self.config, sharding.replicated(self.mesh)
    step = train_step(objective, tx, spec.labels, lr_schedule)
    step_fn = jax.jit(step, in_shardings=(spec.shardings, self.batch_sharding),
                      out_shardings=(spec.shardings, replicated), donate_argnums=0)
    rows = pipeline.rows_of_process(self.batch_sharding, config.input.batch_size)
    train_iter = pipeline.train_iterator(
        self.train_source, transform, rows, config.seed, config.input.num_threads,
        config.input.worker_count)
    context = evaluators.Context(
        mesh=self.mesh, params_sharding=spec.shardings["params"],
        encode_images=encode_images, encode_texts=encode_texts, tokenizer=tokenizer,
        dataset=config.input.dataset, data_dir=config.input.data_dir or None,
        image_size=config.input.image_size,
        batch_size=config.eval_batch_size or config.input.batch_size)
    loop = loop_lib.Loop(
        config=config, workdir=self.workdir, spec=spec, train_step=step_fn,
        train_iter=train_iter, batch_sharding=self.batch_sharding,
        evaluators=evaluators.build(config.evals, context, config.eval_every),
        writer=self.writer)
    try:
      return loop.run()
    finally:
      self.writer.close()


def describe(summary: dict[str, Any]) -> list[str]:
  """Readable result lines: each top-1 with its chance level."""
  lines = [f"finished at step {summary['step']}"]
  for key in sorted(summary):
    if key.endswith("/top1"):
      name = key[:-len("/top1")]
      chance = 1 / summary.get(f"{name}/num_classes", np.inf)
      lines.append(f"{name}: top-1 {summary[key]:.4f} (chance {chance:.4f}), top-5 "
                   f"{summary.get(name + '/top5', float('nan')):.4f}, mean per-class recall "
                   f"{summary.get(name + '/mean_per_class_recall', float('nan')):.4f}")
  return lines
