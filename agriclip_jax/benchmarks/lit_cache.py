"""LiT from cached image features against plain LiT, printed as JSON:

  python -m agriclip_jax.benchmarks.lit_cache [--config=configs/alive_lit.py:demo]
      [--views=0,4] [--workdir=DIR]

Trains the config's locked image tower once (its first `requires` entry, else it locks its
`init.workdir`), then the same LiT run plain and from an image cache for each number of views,
each in a fresh workdir from that tower and with a fresh cache.
Reports each run's wall time (cache build included), the build alone, and its zero-shot top-1
figures. Run it on an otherwise idle machine: the timings are wall-clock.
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags

from agriclip_jax import config_lib
from agriclip_jax import trainers

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/alive_lit.py:demo", "A LiT config spec.")
flags.DEFINE_list("views", ["0", "4"], "Cached views per image to compare with plain LiT.")
flags.DEFINE_string("workdir", "", "Where the runs go (default: a new temporary directory).")


def run(config, workdir: str) -> dict:
  start = time.time()
  summary = trainers.run(config, workdir)
  return {"seconds": time.time() - start, "steps": summary["step"],
          **{k: v for k, v in summary.items() if k.endswith(("/top1", "/top5"))}}


def main(argv):
  del argv
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="agriclip_lit_cache_bench_")
  base = config_lib.load(FLAGS.config)
  tower = base.init.workdir
  if base.requires:  # The locked tower, trained once (not timed).
    entry = base.requires[0]
    tower = os.path.join(root, "image_tower")
    trainers.run(config_lib.load(entry["config"]), tower)
  results = {"config": FLAGS.config, "workdir": root}
  for views in [None] + [int(v) for v in FLAGS.views]:
    config = config_lib.load(FLAGS.config)
    config.requires = []
    config.init.workdir = tower
    name = "plain" if views is None else f"cache_views{views}"
    if views is not None:
      config.image_cache.update(enabled=True, views=views,
                                dir=os.path.join(root, f"{name}_image_cache"))
    results[name] = run(config, os.path.join(root, name))
    if views is not None:
      build = 0.0  # A fresh directory: the caches of this run's datasets.
      for key in os.listdir(config.image_cache.dir):
        with open(os.path.join(config.image_cache.dir, key, "meta.json")) as f:
          build += json.load(f)["build_seconds"]
      results[name].update(build_seconds=build,
                           training_seconds=results[name]["seconds"] - build)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  app.run(main)
