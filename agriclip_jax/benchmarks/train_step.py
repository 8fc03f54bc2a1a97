"""Training-step throughput of CLIP and LiT on a fixed spec, printed as JSON.

  python -m agriclip_jax.benchmarks.train_step [--spec ti|b16] [--steps 10] \
      [--batch_size 32] [--dtype bfloat16] [--micro_batches 4] [--scan]

Specs (AdamW, random inputs, no data pipeline):
- `ti` (default): image tower ViT-Ti/16 at 224 px (width 192, depth 12, 3 heads, MLP 768),
  text tower width 256, depth 6, 4 heads, context 32, vocab 10000, embeddings 256.
- `b16`: OpenAI CLIP ViT-B/16's shapes: ViT-B/16 at 224 px (width 768, depth 12, 12 heads,
  MLP 3072), text tower width 512, depth 12, 8 heads, context 77, vocab 49408, embeddings 512.

`--dtype bfloat16` runs the towers' matmuls in bf16 (parameters, optimizer state and loss stay
float32); `--micro_batches` times the embedding-cache step; `--scan` runs each tower's blocks
as one `lax.scan` (compare `compile_seconds`; FLOPs and MFU are then null, as XLA's cost
analysis counts a loop's body once). FLOPs per sample come from XLA's
cost analysis of the compiled step; MFU is achieved FLOP/s over the matmul throughput measured
in the same process in the same dtype (a large square matmul at JAX's default precision: on
GPUs a float32 matmul may use TF32). CLIP trains both towers; LiT freezes the image tower (no
image backward pass, no image optimizer state).
"""

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agriclip_jax import optim
from agriclip_jax import sharding
from agriclip_jax.input import preprocess
from agriclip_jax.models import two_towers
from agriclip_jax.trainers import common
from agriclip_jax.trainers import contrastive
from agriclip_jax.trainers import state as state_lib
from agriclip_jax.trainers import step as step_lib

FLAGS = flags.FLAGS

SPECS = {
    "ti": (dict(img=dict(variant="Ti/16", pool_type="tok", head=True),
                txt=dict(width=256, depth=6, num_heads=4, mlp_dim=1024, head=True),
                out_dim=256, logit_scale_init=10.0, logit_bias_init=None), 10_000, 32),
    "b16": (dict(img=dict(preset="clip", variant="B/16"),
                 txt=dict(preset="clip", width=512, depth=12, num_heads=8, mlp_dim=2048),
                 out_dim=512, logit_scale_init=10.0, logit_bias_init=None), 49_408, 77),
}
RULES = {"clip": [(".*", {})], "lit": [("img/.*", None), (".*", {})]}


def matmul_peak(size: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
  """Best `dtype` matmul FLOP/s of `size`^2 x `size`^2 on this process's first device."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def time_mode(mode: str, batch_size: int, image_size: int, steps: int, warmup: int,
              dtype: str = "float32", micro_batches: int = 1, spec_name: str = "ti",
              scan: bool = False):
  mesh = sharding.make_mesh([("data", -1)])
  spec_dict, vocab, context = SPECS[spec_name]
  spec_dict = dict(spec_dict, img=dict(spec_dict["img"], scan=scan),
                   txt=dict(spec_dict["txt"], scan=scan))
  model = two_towers.make(ml_collections.ConfigDict(dict(spec_dict, dtype=dtype)),
                          vocab_size=vocab)

  def model_init(rng):
    return model.init(rng, jnp.zeros((1, image_size, image_size, 3)),
                      jnp.zeros((1, context), jnp.int32))["params"]

  optim_config = common.base_config().optim
  optim_config.update(lr=1e-4, warmup_steps=10, rules=RULES[mode])
  shape = jax.eval_shape(model_init, jax.random.key(0))
  tx, labels, lr = optim.make(optim_config, shape, total_steps=1000)
  spec = state_lib.make_spec(model_init, tx, labels, mesh, [(".*", "fsdp")], seed=0)
  run_config = contrastive.default_config()
  run_config.micro_batches = micro_batches
  batch_sharding = sharding.batch_sharding(mesh)
  step = step_lib.jit_step(contrastive.make_step(run_config, model, preprocess.normalize, mesh,
                                                 tx, labels, lr, batch_size), spec, mesh)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({
      "image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8),
      "text": rng.integers(1, vocab, (batch_size, context)).astype(np.int32)},
      batch_sharding)
  state = spec.init()
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  for _ in range(warmup):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  sizes = {k: int(np.prod(v.shape)) for k, v in optim.flatten(shape).items()}
  # XLA's cost analysis counts a loop's body once, not once per trip: no FLOPs for a scan.
  flops = None if scan else cost["flops"]
  return {
      "samples_per_sec": batch_size / seconds,
      "step_ms": seconds * 1000,
      "flops_per_sample": flops and flops / batch_size,
      "achieved_flops_per_sec": flops and flops / seconds,
      "compile_seconds": compile_seconds,
      "trainable_params": sum(n for k, n in sizes.items() if labels[k] != optim.FROZEN),
      "frozen_params": sum(n for k, n in sizes.items() if labels[k] == optim.FROZEN),
      "final_loss": float(metrics["loss"]),
      # XLA's own figures for this backend: what the planner estimates from the CPU compiler.
      "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
      "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
  }


def main(argv):
  del argv
  # On a GPU a 2048^2 matmul is launch-bound: measure the peak on a size that fills the chip.
  size = 8192 if jax.default_backend() == "gpu" else 2048
  # One device's peak: MFU is meant for one accelerator (simulated CPU devices share cores).
  peak = matmul_peak(size=size, dtype=FLAGS.dtype)
  result = {"backend": jax.default_backend(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "spec": FLAGS.spec,
            "jax": jax.__version__, "batch_size": FLAGS.batch_size,
            "image_size": FLAGS.image_size, "dtype": FLAGS.dtype,
            "micro_batches": FLAGS.micro_batches, "scan": FLAGS.scan,
            "matmul_peak_flops_per_sec": peak,
            "matmul_peak_size": size}
  for mode in FLAGS.modes:
    numbers = time_mode(mode, FLAGS.batch_size, FLAGS.image_size, FLAGS.steps, FLAGS.warmup,
                        FLAGS.dtype, FLAGS.micro_batches, FLAGS.spec, FLAGS.scan)
    achieved = numbers["achieved_flops_per_sec"]
    numbers["mfu"] = achieved and achieved / peak
    result[mode] = numbers
  print(json.dumps(result, indent=1))


def define_flags() -> None:
  """The command's flags, defined when it runs (not on import: commands' flags would
  collide in one process)."""
  flags.DEFINE_enum("spec", "ti", list(SPECS), "Model shapes: ti (ViT-Ti/16 + small text) or "
                    "b16 (OpenAI CLIP ViT-B/16's shapes).")
  flags.DEFINE_integer("steps", 10, "Timed steps per mode.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
  flags.DEFINE_integer("batch_size", 32, "Global batch size.")
  flags.DEFINE_integer("image_size", 224, "Image size.")
  flags.DEFINE_list("modes", ["clip", "lit"], "Which trainings to time.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "The towers' compute dtype.")
  flags.DEFINE_integer("micro_batches", 1, "Embedding-cache micro-batches per step.")
  flags.DEFINE_bool("scan", False, "Run each tower's blocks as one lax.scan.")


def run() -> None:
  """The command (`agriclip-benchmark` where the package is installed)."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
