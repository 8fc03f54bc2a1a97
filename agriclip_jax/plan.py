"""What a contrastive config needs per device, before renting the devices.

  python -m agriclip_jax.plan --config configs/alive_clip.py --devices 256 \\
      [--mesh '[("data", -1), ("fsdp", 4)]'] [--budget_gib 80] [--config.field=value ...]

Compiles the config's real train step (model, optimizer, sharding rules, loss) for N simulated
CPU devices, with abstract inputs: no data, no weights, no run. Prints a table on stderr and
JSON on stdout: per-device bytes of parameters, optimizer state and the batch, XLA's
temporaries (activations and everything else the step allocates), the loss's own part of
them (the loss and its gradient compiled alone on embeddings), FLOPs per step; with
`--budget_gib`, the largest per-device batch whose step fits in that many GiB.

These are XLA's CPU compiler's figures on simulated devices: they estimate, not measure, what
a GPU or TPU needs (fusion, layouts and collective buffers differ by backend).
"""

import json
import math
import os
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from agriclip_jax import config_lib

_FLAGS = {}
GIB = 2**30
CPU_NOTE = ("XLA CPU compiler on simulated devices: an estimate of GPU/TPU memory, not a "
            "measurement (fusion, layouts and collective buffers differ by backend)")


def define_flags() -> None:
  config_flags.register_flag_parser_for_type(list, config_lib.ListParser())
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", None, "Config file and its argument: configs/x.py[:arg].", lock_config=True)
  _FLAGS["devices"] = flags.DEFINE_integer("devices", 8, "Number of devices to plan for.")
  _FLAGS["mesh"] = flags.DEFINE_string(
      "mesh", None, 'Mesh to plan for, a Python literal: [("data", -1), ("fsdp", 4)] '
      "(default: config.mesh).")
  _FLAGS["budget_gib"] = flags.DEFINE_float(
      "budget_gib", 0.0, "Per-device memory budget in GiB: search the largest per-device "
      "batch whose step fits (0: no search).")
  flags.mark_flag_as_required("config")


def simulate_devices(argv: list[str]) -> None:
  """Asks XLA for `--devices` CPU devices; before JAX makes its backend (the config file,
  loaded while flags are parsed, already imports JAX)."""
  count = None
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      count = arg.split("=", 1)[1]
    elif arg == "--devices" and i + 1 < len(argv):
      count = argv[i + 1]
  count = count if count and count.isdigit() else "8"
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                     os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={count}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded abstract arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in jax.tree.leaves(tree)))


class Planner:
  """Compiles one config's train step (and its loss alone) for a given per-device batch."""

  def __init__(self, config):
    import functools  # pylint: disable=g-import-not-at-top
    from agriclip_jax import optim  # pylint: disable=g-import-not-at-top
    from agriclip_jax import sharding  # pylint: disable=g-import-not-at-top
    from agriclip_jax.input import preprocess  # pylint: disable=g-import-not-at-top
    from agriclip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
    from agriclip_jax.trainers import contrastive  # pylint: disable=g-import-not-at-top
    from agriclip_jax.trainers import state as state_lib  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top

    if config.trainer != "contrastive":
      raise config_lib.ConfigError(
          f"the planner knows the contrastive trainer (CLIP, SigLIP, LiT); this config's "
          f"trainer is {config.trainer!r}")
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh)
    self.shards = config.input.batch_size // sharding.batch_size_per_shard(
        self.mesh, config.input.batch_size)
    self.model = two_towers.make(config.model, vocab_size=config.tokenizer.vocab_size)
    size, length = config.input.image_size, config.tokenizer.max_len

    def model_init(rng):
      images = jax.numpy.zeros((1, size, size, 3), jax.numpy.float32)
      return self.model.init(rng, images, jax.numpy.zeros((1, length), jax.numpy.int32))["params"]

    params_shape = jax.eval_shape(model_init, jax.random.key(0))
    self.tx, labels, self.lr_schedule = optim.make(config.optim, params_shape,
                                                   config.total_steps)
    self.spec = state_lib.make_spec(model_init, self.tx, labels, self.mesh,
                                    config.sharding_rules, config.seed, config.fsdp_min_size)
    if config.image_cache.enabled:  # As the trainer refuses them.
      from agriclip_jax.trainers import image_cache  # pylint: disable=g-import-not-at-top
      image_cache.check(config.image_cache, self.model.image)
      image_cache.check_locked(labels)
    self.normalize = functools.partial(preprocess.normalize, mean=config.input.mean,
                                       std=config.input.std)
    self.out_dim = int(jax.tree.leaves(jax.eval_shape(
        lambda p: self.model.apply({"params": p}, None,
                                   jax.numpy.zeros((1, length), jax.numpy.int32))[1],
        params_shape))[0].shape[-1])
    self.make_step = functools.partial(contrastive.make_step, config, self.model,
                                       self.normalize, self.mesh, self.tx, self.spec.labels,
                                       self.lr_schedule)

  def _batch(self, global_batch: int):
    import jax  # pylint: disable=g-import-not-at-top
    from agriclip_jax import sharding  # pylint: disable=g-import-not-at-top
    rows = sharding.batch_sharding(self.mesh)
    size, length = self.config.input.image_size, self.config.tokenizer.max_len
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
    batch = {"image": spec((global_batch, size, size, 3), jax.numpy.uint8),
             "text": spec((global_batch, length), jax.numpy.int32),
             "label": spec((global_batch,), jax.numpy.int32)}
    if self.config.image_cache.enabled:  # The step reads cached features, not images.
      from agriclip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
      from agriclip_jax.trainers import image_cache  # pylint: disable=g-import-not-at-top
      del batch["image"]
      batch[image_cache.FEATURES] = spec(
          (global_batch, two_towers.feature_width(self.model.image)), jax.numpy.float32)
    return batch

  def step(self, per_device: int) -> dict:
    """Figures of the train step at `per_device` examples per batch shard."""
    from agriclip_jax.trainers import step as step_lib  # pylint: disable=g-import-not-at-top
    global_batch = per_device * self.shards
    step = self.make_step(batch_size=global_batch)
    compiled = step_lib.jit_step(step, self.spec, self.mesh).lower(
        self.spec.abstract, self._batch(global_batch)).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state = self.spec.abstract
    figures = {
        "global_batch": global_batch,
        "per_device_batch": per_device,
        "params_bytes": _shard_bytes(state["params"]),
        "opt_state_bytes": _shard_bytes(state["opt_state"]),
        "batch_bytes": _shard_bytes(self._batch(global_batch)),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "loss_temp_bytes": self.loss_temp_bytes(global_batch),
        "flops_per_device": float(cost.get("flops", 0.0)),
    }
    # Arguments (the donated state and the batch) stay live; the new state reuses the old
    # one's buffers, so outputs beyond the aliased ones add to the peak.
    figures["peak_bytes"] = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return figures

  def loss_temp_bytes(self, global_batch: int) -> int:
    """Temporaries of the config's loss (as the step computes it, metrics included) and its
    gradient alone, on embeddings of the global batch."""
    import jax  # pylint: disable=g-import-not-at-top
    from agriclip_jax import sharding  # pylint: disable=g-import-not-at-top
    from agriclip_jax.trainers import contrastive  # pylint: disable=g-import-not-at-top
    config = self.config
    loss_and_metrics = contrastive.make_loss(
        config.loss, config.loss_targets, config.loss_targets_weight, config.loss_chunk_size,
        self.mesh, global_batch, config.logit_precision)
    emb = jax.ShapeDtypeStruct((global_batch, self.out_dim), jax.numpy.float32,
                               sharding=sharding.batch_sharding(self.mesh))
    scalars = {"logit_scale": jax.numpy.float32(10.0)}
    if config.model.logit_bias_init is not None:
      scalars["logit_bias"] = jax.numpy.float32(0.0)

    def loss(zimg, ztxt, batch):
      return loss_and_metrics(zimg, ztxt, scalars, batch)

    grad_fn = jax.grad(loss, (0, 1), has_aux=True)
    compiled = jax.jit(grad_fn).lower(emb, emb, self._batch(global_batch)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)

  def largest_batch(self, budget_bytes: int, start: int, limit: int = 16) -> dict | None:
    """The largest per-device batch whose step's peak fits `budget_bytes`: doubling from
    `start`, then bisection, over multiples of the size that keeps the global batch divisible
    by the loss chunk and the shard by the micro-batches; at most `limit` compiles. None when
    the smallest does not fit."""
    chunk = self.config.loss_chunk_size
    unit = math.lcm(chunk // math.gcd(chunk, self.shards) if chunk else 1,
                    self.config.micro_batches)
    fits, fails = None, None  # (units, figures) that fit; the fewest units that do not.
    units = max(start // unit, 1)
    for _ in range(limit):
      figures = self.step(units * unit)
      if figures["peak_bytes"] <= budget_bytes:
        fits = (units, figures)
      else:
        fails = units
      if fails is None:
        units *= 2
      elif fits is None:
        if fails == 1:
          return None
        units = fails // 2
      elif fails - fits[0] <= 1:
        break
      else:
        units = (fits[0] + fails) // 2
    if fits is None:
      return None
    return dict(fits[1], exact=fails is not None and fails - fits[0] <= 1)


def _mib(n) -> str:
  return f"{n / 2**20:,.1f}"


def table(plan: dict) -> str:
  step = plan["step"]
  lines = [f"{plan['config']} on {plan['devices']} devices, mesh {plan['mesh']}",
           f"global batch {step['global_batch']} ({step['per_device_batch']} per batch shard)",
           "per device                        MiB"]
  for key, name in (("params_bytes", "parameters"), ("opt_state_bytes", "optimizer state"),
                    ("batch_bytes", "batch"), ("temp_bytes", "temporaries (XLA)"),
                    ("loss_temp_bytes", "  of which the loss, alone"),
                    ("peak_bytes", "peak")):
    lines.append(f"  {name:<28}{_mib(step[key]):>12}")
  lines.append(f"  TFLOP per step and device    {step['flops_per_device'] / 1e12:.3f}")
  if "largest_batch" in plan:
    best = plan["largest_batch"]
    lines.append(f"largest per-device batch under {plan['budget_gib']} GiB: "
                 + ("none (one example does not fit)" if best is None else
                    f"{best['per_device_batch']} (peak {_mib(best['peak_bytes'])} MiB"
                    + ("" if best["exact"] else ", search stopped early") + ")"))
  lines.append("note: " + CPU_NOTE)
  return "\n".join(lines)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  config = _FLAGS["config"].value
  try:
    if _FLAGS["mesh"].value:
      with config.unlocked():
        config.mesh = config_lib.parse_list(_FLAGS["mesh"].value)
    if jax.device_count() != _FLAGS["devices"].value:
      raise config_lib.ConfigError(
          f"asked for {_FLAGS['devices'].value} devices, JAX has {jax.device_count()} "
          f"({jax.default_backend()}): run the planner in a fresh process")
    planner = Planner(config)
    per_device = config.input.batch_size // planner.shards
    plan = {"config": flags.FLAGS["config"].config_filename, "devices": jax.device_count(),
            "mesh": dict(planner.mesh.shape), "loss": config.loss,
            "loss_chunk_size": config.loss_chunk_size, "micro_batches": config.micro_batches,
            "step": planner.step(per_device),
            "note": CPU_NOTE}
    if _FLAGS["budget_gib"].value:
      plan["budget_gib"] = _FLAGS["budget_gib"].value
      plan["largest_batch"] = planner.largest_batch(int(_FLAGS["budget_gib"].value * GIB),
                                                    per_device)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(table(plan), file=sys.stderr)
  print(json.dumps(plan))
  return 0


def run(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  simulate_devices(argv)
  from agriclip_jax import launch  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(lambda args: sys.exit(main(args)), argv=config_lib.locate_config_arg(argv),
          flags_parser=launch.parse_flags)


if __name__ == "__main__":
  run()
