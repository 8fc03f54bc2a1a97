"""Input benchmarks, printed as JSON.

  python -m agriclip_jax.benchmarks.input build --images=2000,20000
      Generates ALive-style trees of that many JPEGs and builds each with the `alive` builder
      in a fresh process: wall time and that process's peak RSS. Flat RSS across sizes shows
      the build streams.

  python -m agriclip_jax.benchmarks.input pipeline [--images=1000 --image_size=224]
      Builds one such tree at iNaturalist-like resolution (500x375) and times the training
      pipeline (decode + random resized crop + flip + tokenize + batch) for several thread and
      worker counts: images/s, and images/s per core used.
"""

import io
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

FLAGS = flags.FLAGS


def write_tree(root: str, count: int, size=(500, 375), sources: int = 8,
               classes: int = 12) -> None:
  """`count` JPEGs in <source>/<class>/ folders: smooth colour fields with noise.

  Written under a temporary name and renamed when complete, so an interrupted run is redone.
  """
  if os.path.isdir(root):
    return
  partial = root + ".partial"
  rng = np.random.default_rng(0)
  for i in range(count):
    source, klass = i % sources, (i // sources) % classes
    folder = os.path.join(partial, f"source_{source}", f"class_{klass}")
    os.makedirs(folder, exist_ok=True)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
    pixels = np.asarray(image, np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
      f.write(buffer.getvalue())
  os.rename(partial, root)


_REPORT_RSS = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
               "try:\n  runpy.run_module('agriclip_jax.input.prepare', run_name='__main__')\n"
               "finally:\n  print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF)"
               ".ru_maxrss, file=sys.stderr)")


def _build_in_child(raw: str, data_dir: str) -> dict:
  """Builds `alive` from `raw` in a fresh process; its wall time and its own peak RSS."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  start = time.time()
  result = subprocess.run([sys.executable, "-c", _REPORT_RSS, "prepare", "alive",
                           f"--manual_dir={raw}", f"--data_dir={data_dir}"], cwd=repo,
                          capture_output=True, text=True)
  seconds = time.time() - start
  peak = [line for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
  if result.returncode or not peak:
    raise RuntimeError(result.stderr[-2000:])
  return {"build_seconds": seconds, "peak_rss_mb": int(peak[-1].split()[1]) / 1024}


def build(workdir: str, sizes: list[int]) -> dict:
  out = {}
  for count in sizes:
    raw = os.path.join(workdir, f"tree_{count}")
    start = time.time()
    write_tree(raw, count, size=(320, 240))
    print(f"{count} images ready after {time.time() - start:.0f}s", file=sys.stderr)
    stats = _build_in_child(raw, os.path.join(workdir, f"tfds_{count}"))
    stats["images_per_sec"] = count / stats["build_seconds"]
    out[str(count)] = stats
  return out


def pipeline(workdir: str, count: int, image_size: int, seconds: float) -> dict:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from agriclip_jax.input import datasets  # pylint: disable=g-import-not-at-top
  from agriclip_jax.input import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from agriclip_jax.input import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  raw, data_dir = os.path.join(workdir, f"tree_{count}_full"), os.path.join(workdir, "tfds")
  write_tree(raw, count)
  if not os.path.isdir(os.path.join(data_dir, "alive")):
    _build_in_child(raw, data_dir)
  builder = datasets.builder("alive", data_dir, prepare=False)
  source = datasets.data_source(builder, "train")
  tok = tokenizer_lib.from_trained(tokenizer_lib.train_bpe(
      [c.decode() for i in range(0, len(source), 50) for c in source[i]["captions"]], 2000), 32)
  transform = pipeline_lib.TrainTransform(image_size=image_size, tokenize=tok.encode)
  results = {"images": len(source), "image_size": image_size,
             "source_resolution": "500x375 JPEG", "cores": os.cpu_count()}
  for threads, workers in ((1, 0), (2, 0), (8, 0), (1, 2)):
    batch = 32
    iterator = pipeline_lib.train_iterator([(source, transform, 1.0)],
                                           pipeline_lib.Rows(0, batch, batch), seed=0,
                                           num_threads=threads, worker_count=workers)
    next(iterator)  # Start-up (worker processes, first decode) is not timed.
    start, images = time.time(), 0
    while time.time() - start < seconds:
      images += len(next(iterator)["image"])
    rate = images / (time.time() - start)
    cores = min(os.cpu_count(), max(threads, workers))
    results[f"threads={threads},workers={workers}"] = {
        "images_per_sec": rate, "cores_used": cores, "images_per_sec_per_core": rate / cores}
    iterator.close()
  return results


def main(argv):
  if len(argv) != 2 or argv[1] not in ("build", "pipeline"):
    raise app.UsageError("usage: python -m agriclip_jax.benchmarks.input build|pipeline")
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="agriclip_bench_")
  if argv[1] == "build":
    sizes = [int(n) for n in (FLAGS.images or ["2000", "20000"])]
    result = {"benchmark": "alive build", "workdir": workdir, **build(workdir, sizes)}
  else:
    count = int((FLAGS.images or ["1000"])[0])
    result = {"benchmark": "training pipeline",
              **pipeline(workdir, count, FLAGS.image_size, FLAGS.seconds)}
  print(json.dumps(result, indent=1))


def define_flags() -> None:
  """The command's flags, defined when it runs (not on import: commands' flags would
  collide in one process)."""
  flags.DEFINE_list("images", None, "Tree sizes (build) or the tree size (pipeline).")
  flags.DEFINE_integer("image_size", 224, "Training crop size (pipeline).")
  flags.DEFINE_float("seconds", 10.0, "Time each pipeline setting for this long.")
  flags.DEFINE_string("workdir", None, "Where trees and datasets go (default: tmp).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
