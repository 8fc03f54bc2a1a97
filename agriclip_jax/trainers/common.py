"""What every trainer shares: base config fields, mesh + data + writer setup, and the run."""

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

from absl import logging
import flax
import jax
import ml_collections
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import files
from agriclip_jax import metric_writer
from agriclip_jax import optim
from agriclip_jax import sharding
from agriclip_jax.evaluators import base as evaluators
from agriclip_jax.input import datasets
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess
from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.trainers import loop as loop_lib
from agriclip_jax.trainers import state as state_lib
from agriclip_jax.trainers import step as step_lib

# Per-dataset fields of config.input; each entry of config.input.mixture may set them.
COMPONENT_FIELDS = ("dataset", "split", "weight", "image_key", "text_key", "text_choice",
                    "label_key", "classes")
# Fields a required run inherits from the run that needs it (same data, same devices).
INHERITED_BY_REQUIRED_RUNS = (("input", "data_dir"), ("mesh",), ("input", "num_threads"))


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
      weight=1.0,
      data_dir="",  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
      batch_size=256,  # Global: split over all devices of all processes.
      image_size=224,
      image_key="image",
      text_key="captions",  # A feature, or a nested one: "texts/lit_species".
      text_choice="step",  # From a list/dict of texts: one per step, or one per "example".
      label_key="label",
      # "" = every example; else only these classes' ("name,name" or label ids "0-19,25").
      classes="",
      # [dict(dataset=..., weight=..., ...)]: train on several datasets, sampled by weight;
      # each entry may set the fields of COMPONENT_FIELDS, the rest come from above.
      mixture=[],
      crop_scale=(0.5, 1.0),
      flip=True,
      mean=preprocess.CLIP_MEAN,
      std=preprocess.CLIP_STD,
      num_threads=8,
      worker_count=0,  # >0: decode in that many worker processes.
      # A training image that fails to decode is replaced by the next example (and named in a
      # warning); the run stops once more than this many plus this share of the examples read
      # have failed.
      max_undecodable=10,
      max_undecodable_rate=0.001,
  )
  config.optim = dict(
      name="adamw", lr=1e-3, schedule="cosine", warmup_steps=0, end_lr_factor=0.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, decay_regex=".*/kernel",
      clip_norm=1.0, clip_mode="global", rules=[(".*", {})])
  # None: constant decay; else a cosine from weight_decay to this (DINO: 0.04 -> 0.4).
  config.optim.weight_decay_end = ml_collections.FieldReference(None, field_type=float)
  config.evals = ml_collections.ConfigDict()
  config.eval_batch_size = 0  # 0 = input.batch_size
  config.init = dict(
      workdir="",  # Copy parameters from this run's latest checkpoint ({workdir} allowed).
      params=".*",  # Regex: which of its parameters to copy...
      skip="",  # ...and which not (also for the checkpoints below; skipped ones stay random).
      # Pretrained checkpoints in other formats (see models/importers): `model` fills both
      # towers and the logit scale/bias; `img` / `txt` fill one tower each. `format` is
      # detected when "", `classifier` also loads an image checkpoint's classifier head.
      model=dict(path="", format=""),
      img=dict(path="", format="", classifier=False),
      txt=dict(path="", format=""),
      # Regex of parameters that a loaded checkpoint lacks and that may keep their random
      # initial values (e.g. a new projection head); any other gap stops the run.
      allow_random="",
  )
  # Runs this one needs, trained first when unfinished: [dict(workdir=..., config=...)],
  # e.g. the image tower LiT locks, or the CLIP and DINO runs an alignment reads.
  config.requires = []
  # Resuming with fields that change the run's course (RESUME_NEUTRAL names those that do not)
  # stops unless this is True; the replaced config is then kept as config.<step>.json.
  config.allow_config_change = False
  return config


def check_values(config) -> None:
  """Values that would otherwise fail deep inside a library."""
  positive = {"total_steps": config.total_steps, "input.batch_size": config.input.batch_size,
              "input.image_size": config.input.image_size,
              "keep_checkpoints": config.keep_checkpoints}
  non_negative = {"log_every": config.log_every, "eval_every": config.eval_every,
                  "checkpoint_every": config.checkpoint_every,
                  "eval_batch_size": config.eval_batch_size,
                  "input.num_threads": config.input.num_threads,
                  "input.worker_count": config.input.worker_count,
                  "input.max_undecodable": config.input.max_undecodable,
                  "input.max_undecodable_rate": config.input.max_undecodable_rate}
  for name, value in positive.items():
    if value < 1:
      raise config_lib.ConfigError(f"config.{name} must be at least 1; got {value}")
  for name, value in non_negative.items():
    if value < 0:
      raise config_lib.ConfigError(f"config.{name} must not be negative; got {value}")
  if config.input.text_choice not in ("step", "example"):
    raise config_lib.ConfigError("config.input.text_choice must be 'step' or 'example'; got "
                                 f"{config.input.text_choice!r}")


# Fields a resumed run may change without changing its course: how often it logs, evaluates
# and saves, what it evaluates, where data lives, how it is laid out on devices, how many
# undecodable images it tolerates, and what only a run's start reads (init, requires). Dotted names; a name covers the fields below it.
RESUME_NEUTRAL = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "evals",
                  "eval_batch_size", "input.data_dir", "input.num_threads",
                  "input.worker_count", "input.max_undecodable", "input.max_undecodable_rate",
                  "mesh", "sharding_rules", "fsdp_min_size", "init", "requires",
                  "allow_config_change", "image_cache.dir", "image_cache.shard_size")


def save_config(config, workdir: str) -> None:
  """Writes config.json; when resuming, first compares it with the run's stored config.

  A change outside RESUME_NEUTRAL (total_steps moves the schedule, batch size and learning
  rate the trajectory) is refused in one line listing the changes, unless
  `config.allow_config_change`; then the stored config is kept as config.<step>.json (step:
  the checkpoint it led to), so the run's history says which config made which steps.
  """
  path = files.path(workdir) / "config.json"
  step = state_lib.latest_step(files.join(workdir, "checkpoints"))
  new = json.loads(config.to_json_best_effort())
  if step is not None and path.exists():
    old = files.read_json(path)
    changes = config_lib.changes(old, new, RESUME_NEUTRAL)
    # Fields the stored config lacks were added to the code since (their defaults keep the
    # old behaviour): logged, not refused, so an update does not strand running jobs.
    added = [c for c in changes if ": (unset) -> " in c]
    if added:
      logging.warning("Fields the stored config lacks (added since it was written): %s",
                      "; ".join(added))
    changes = [c for c in changes if c not in added]
    if changes and not config.allow_config_change:
      raise config_lib.ConfigError(
          f"the config differs from the one that trained {workdir} to step {step}: "
          f"{'; '.join(changes)}; to resume with it anyway, add "
          "--config.allow_config_change=True (the old config is kept as "
          f"config.{step}.json)")
    history = files.path(workdir) / f"config.{step}.json"
    # A config that trained no checkpoint (its run stopped before one) is history to no step.
    if changes and jax.process_index() == 0 and not history.exists():
      files.write_atomic(history, path.read_text())
    if changes:
      logging.warning("Resuming at step %d with a changed config: %s", step, "; ".join(changes))
  if jax.process_index() == 0:
    files.write_atomic(path, config.to_json_best_effort(indent=1))


def components(input_config) -> list[dict[str, Any]]:
  """The training datasets: input.mixture's entries completed from input, else input."""
  base = {k: input_config[k] for k in COMPONENT_FIELDS}
  if not input_config.mixture:
    return [base]
  out = []
  for i, entry in enumerate(input_config.mixture):
    entry = dict(entry)
    config_lib.check_keys(entry, COMPONENT_FIELDS, f"input.mixture[{i}]")
    if float(entry.get("weight", 1.0)) <= 0:
      raise config_lib.ConfigError(f"input.mixture[{i}].weight must be positive")
    out.append({**base, **entry})
  return out


def check_feature(builder, key: str, where: str) -> None:
  """ConfigError unless the dataset has feature `key` ("a/b" for nested features)."""
  features = builder.info.features
  for part in key.split("/"):
    if not hasattr(features, "keys") or part not in features.keys():
      raise config_lib.ConfigError(
          f"{where}={key!r}: {builder.info.full_name} has no such feature (it has "
          f"{sorted(builder.info.features.keys())})")
    features = features[part]


def finished(config, workdir: str) -> dict[str, Any] | None:
  summary = loop_lib.finished_summary(workdir, config.total_steps)
  if summary is not None:
    logging.info("%s already finished at step %d; nothing to do.", workdir, summary["step"])
  return summary


def run_requirements(config, workdir: str) -> None:
  """Trains the runs in `config.requires` that are unfinished, unless this one has started.

  Each runs with its own config, but inherits this run's data directory, mesh and input
  threads (INHERITED_BY_REQUIRED_RUNS), so choices about where and how to run apply to it.
  """
  if not config.requires or state_lib.latest_step(files.join(workdir, "checkpoints")):
    return
  from agriclip_jax import trainers  # pylint: disable=g-import-not-at-top  (cycle)
  for i, entry in enumerate(config.requires):
    config_lib.check_keys(entry, ("workdir", "config"), f"requires[{i}]")
    required_workdir = config_lib.expand_path(entry["workdir"], workdir)
    required = config_lib.load(entry["config"])
    for path in INHERITED_BY_REQUIRED_RUNS:
      source, target = config, required
      for key in path[:-1]:
        source, target = source[key], target[key]
      target[path[-1]] = source[path[-1]]
    logging.info("Required run: %s -> %s", entry["config"], required_workdir)
    warn_if_reused_with_another_config(required, required_workdir, entry["config"])
    trainers.run(required, required_workdir)


def warn_if_reused_with_another_config(required, workdir: str, name: str) -> None:
  """A finished required run is used as it is, also when it was trained with another config
  than `required` (a stage run by hand with other options, or another dataset in the same
  root): that is then said, field by field, rather than left unseen."""
  stored = files.path(workdir) / "config.json"
  if not stored.exists() or loop_lib.finished_summary(workdir, required.total_steps) is None:
    return  # Nothing to reuse; an unfinished run is compared when it resumes (save_config).
  changes = config_lib.changes(json.loads(required.to_json_best_effort()),
                               files.read_json(stored), RESUME_NEUTRAL)
  if changes:
    logging.warning("Using the finished run in %s, which was trained with another config "
                    "than %s (use another root to train that one): %s", workdir, name,
                    "; ".join(changes))


def make_tokenizer(config, sources) -> tokenizer_lib.Tokenizer:
  """A pretrained tokenizer (config.tokenizer.path, else that of the checkpoint
  config.init.model / config.init.txt loads), or a BPE trained on the captions of `sources`
  (and cached).

  `sources` is [(builder, source, component)]; the BPE is saved beside the first dataset
  under a name that identifies what it was trained on.
  """
  if config.tokenizer.path:
    return tokenizer_lib.from_pretrained(os.path.expanduser(config.tokenizer.path),
                                         config.tokenizer.max_len)
  pretrained = config.init.model.path or config.init.txt.path
  if pretrained:  # A pretrained text tower reads its own tokenizer's ids.
    from agriclip_jax.models import importers  # pylint: disable=g-import-not-at-top
    source = config.init.model if config.init.model.path else config.init.txt
    checkpoint = importers.read(source.path, source.format or None)
    if checkpoint.tokenizer is None:
      raise config_lib.ConfigError(
          f"{checkpoint.path} ({checkpoint.format}) ships no tokenizer: set config.tokenizer.path "
          "to the matching tokenizer directory")
    return checkpoint.tokenizer(config.tokenizer.max_len)
  key = json.dumps([[b.info.full_name, c["split"], c["text_key"]] for b, _, c in sources]
                   + [config.tokenizer.vocab_size, config.tokenizer.max_examples])
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  return tokenizer_lib.trained_on_captions(
      [(source, c["text_key"]) for _, source, c in sources],
      files.join(sources[0][0].data_dir, f"tokenizer_bpe_{digest}.json"),
      config.tokenizer.vocab_size, config.tokenizer.max_len, config.tokenizer.max_examples)


def begin(config, workdir: str) -> jax.sharding.Mesh:
  """What every run (trainer, alignment fit, evaluation) does first: checks the config's
  values, trains the runs it requires if unfinished, and makes its device mesh."""
  check_values(config)
  run_requirements(config, workdir)
  return sharding.make_mesh(config.mesh)


def open_workdir(config, workdir: str) -> metric_writer.Writer:
  """Writes config.json (compared with a resumed run's, see `save_config`) and opens the
  metric writer, the config logged as its hyperparameters."""
  save_config(config, workdir)
  writer = metric_writer.Writer(workdir)
  writer.hparams(flax.traverse_util.flatten_dict(config.to_dict(), sep="."))
  return writer


@dataclasses.dataclass
class Setup:
  """Mesh, training data and metric writer of a run."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  batch_sharding: jax.sharding.NamedSharding
  sources: list  # [(builder, random-access source, component dict)], one per dataset.
  writer: metric_writer.Writer

  @property
  def train_builder(self):
    return self.sources[0][0]

  @classmethod
  def create(cls, config, workdir: str, feature_keys=("image_key",)) -> "Setup":
    """`feature_keys` are the component fields naming features the trainer reads."""
    mesh = begin(config, workdir)
    sharding.batch_size_per_shard(mesh, config.input.batch_size)
    sources = []
    for component in components(config.input):
      builder = datasets.builder(component["dataset"], config.input.data_dir or None)
      for key in feature_keys:
        check_feature(builder, component[key], f"input.{key}")
      source = datasets.data_source(builder, component["split"])
      if component["classes"]:
        where = f"input.classes of {builder.info.full_name}"
        check_feature(builder, component["label_key"], "input.label_key")
        names = builder.info.features[component["label_key"]].names
        source = datasets.of_classes(
            source, component["label_key"],
            datasets.class_ids(component["classes"], names, where), where)
      sources.append((builder, source, component))
    writer = open_workdir(config, workdir)
    logging.info("Mesh %s over %d devices in %d processes; training on %s", dict(mesh.shape),
                 jax.device_count(), jax.process_count(),
                 ", ".join(f"{b.info.full_name}/{c['split']} ({len(s)} examples, weight "
                           f"{c['weight']})" for b, s, c in sources))
    return cls(config, workdir, mesh, sharding.batch_sharding(mesh), sources, writer)

  def state_spec(self, model_init: Callable[[jax.Array], Any], **spec_kwargs):
    """(StateSpec, optimizer, lr schedule) for a model, per `config.optim`."""
    config = self.config
    params_shape = jax.eval_shape(model_init, jax.random.key(0))
    tx, labels, lr_schedule = optim.make(config.optim, params_shape, config.total_steps)
    spec = state_lib.make_spec(model_init, tx, labels, self.mesh, config.sharding_rules,
                               config.seed, config.fsdp_min_size, **spec_kwargs)
    sizes = {path: int(np.prod(x.shape)) for path, x in optim.flatten(params_shape).items()}
    frozen = sum(n for path, n in sizes.items() if labels[path] == optim.FROZEN)
    logging.info("Parameters: %s total, %s trainable, %s frozen", f"{sum(sizes.values()):,}",
                 f"{sum(sizes.values()) - frozen:,}", f"{frozen:,}")
    return spec, tx, lr_schedule

  def run(self, spec, step: Callable, make_transform: Callable[[dict], Any],
          encode_images, encode_texts=None, tokenizer=None,
          before_training: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Compiles `step(state, batch) -> (state, metrics)`, builds the data iterator and the
    evaluators, and runs the loop. `make_transform(component)` is one dataset's per-example
    training transform; evaluators see `state[spec.eval_key]` as their parameters;
    `before_training(state)` runs before the first step (see Loop).
    """
    config = self.config
    rows = pipeline.rows_of_process(self.batch_sharding, config.input.batch_size)
    train_iter = pipeline.train_iterator(
        [(source, make_transform(c), c["weight"]) for _, source, c in self.sources], rows,
        config.seed, config.input.num_threads, config.input.worker_count)
    context = evaluators.Context(
        mesh=self.mesh, params_sharding=spec.shardings[spec.eval_key],
        params_abstract=spec.abstract[spec.eval_key], encode_images=encode_images,
        encode_texts=encode_texts, tokenizer=tokenizer,
        dataset=self.sources[0][2]["dataset"], data_dir=config.input.data_dir or None,
        image_size=config.input.image_size,
        batch_size=config.eval_batch_size or config.input.batch_size,
        num_threads=config.input.num_threads)
    loop = loop_lib.Loop(
        config=config, workdir=self.workdir, spec=spec,
        train_step=step_lib.jit_step(step, spec, self.mesh),
        train_iter=train_iter, batch_sharding=self.batch_sharding,
        evaluators=evaluators.build(config.evals, context, config.eval_every),
        writer=self.writer, before_training=before_training)
    try:
      return loop.run()
    finally:
      self.writer.close()


def describe(summary: dict[str, Any]) -> list[str]:
  """Readable result lines: each top-1 with its chance level where the class count is known.

  `step` is 0 for runs that do not train (alignment, evaluation)."""
  lines = [f"finished at step {summary['step']}" if summary.get("step") else "finished"]
  for key in sorted(summary):
    if key.endswith("/top1"):
      name = key[:-len("/top1")]
      classes = summary.get(f"{name}/num_classes")
      chance = f" (chance {1 / classes:.4f})" if classes else ""
      extras = [f"{label} {summary[name + '/' + k]:.4f}" for k, label in (
          ("top5", "top-5"), ("mean_per_class_recall", "mean per-class recall"))
                if f"{name}/{k}" in summary]
      lines.append(f"{name}: top-1 {summary[key]:.4f}{chance}"
                   + "".join(f", {e}" for e in extras))
  return lines
