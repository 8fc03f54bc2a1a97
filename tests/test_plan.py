"""The memory planner (python -m agriclip_jax.plan), run as its command."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax.models import two_towers
from conftest import REPO

TINY = "tests/tiny_config.py:kind=clip"


def plan(*args):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # The planner sets its own device count.
  return subprocess.run([sys.executable, "-m", "agriclip_jax.plan", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _param_count(config) -> int:
  model = two_towers.make(config.model, vocab_size=config.tokenizer.vocab_size)
  size, length = config.input.image_size, config.tokenizer.max_len
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jax.numpy.zeros((1, size, size, 3)),
      jax.numpy.zeros((1, length), jax.numpy.int32)))["params"]
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_plan_reports_state_batch_temporaries_and_flops_per_device():
  overrides = ["--config.input.batch_size=512", "--config.sharding_rules=[('.*', 'replicate')]"]
  plain = plan(f"--config={TINY}", "--devices=8", *overrides)
  assert plain.returncode == 0, plain.stderr[-3000:]
  figures = json.loads(plain.stdout)
  step = figures["step"]
  assert figures["devices"] == 8 and figures["mesh"] == {"data": 8, "fsdp": 1}
  assert step["global_batch"] == 512 and step["per_device_batch"] == 64
  # Replicated float32 parameters: 4 bytes each on every device; AdamW keeps two moments.
  params = _param_count(config_lib.load(TINY)) * 4
  assert step["params_bytes"] == params
  assert 2 * params <= step["opt_state_bytes"] <= 2 * params + 64
  assert step["batch_bytes"] == 64 * (32 * 32 * 3 + 16 * 4 + 4)  # uint8 images, int32 ids.
  assert step["flops_per_device"] > 0 and step["temp_bytes"] > step["loss_temp_bytes"] > 0
  assert "largest_batch" not in figures
  assert "an estimate of GPU/TPU memory" in plain.stderr  # The table says what it is.
  assert "of which the loss, alone" in plain.stderr


def _planner(**fields):
  from agriclip_jax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load(TINY)
  config.update(fields)
  return plan_lib.Planner(config)


def test_chunked_loss_needs_a_fraction_of_the_plain_loss_memory():
  """At 8 x 256 examples, a device's rows of the plain loss are 256 x 2048 logits; the
  chunked loss holds 256 x 64 at a time, plus the gathered 2048 x 32 embeddings."""
  plain = _planner().loss_temp_bytes(2048)
  chunked = _planner(loss_chunk_size=64).loss_temp_bytes(2048)
  assert plain >= 256 * 2048 * 4
  assert chunked * 5 < plain, (chunked, plain)


def test_largest_batch_search_finds_the_boundary_in_chunk_multiples():
  planner = _planner(loss_chunk_size=32)  # 8 batch shards: per-device batches of 4k.
  tried = []

  def step(per_device):
    tried.append(per_device)
    return {"per_device_batch": per_device, "peak_bytes": 1000 * per_device + 500}

  planner.step = step
  best = planner.largest_batch(budget_bytes=75_000, start=8)
  assert best == {"per_device_batch": 72, "peak_bytes": 72_500, "exact": True}
  assert all(size % 4 == 0 for size in tried) and len(tried) <= 10
  assert planner.largest_batch(budget_bytes=3_000, start=8) is None  # 4 needs 4,500 bytes.
  unbounded = planner.largest_batch(budget_bytes=10**12, start=8, limit=3)
  assert unbounded["per_device_batch"] == 32 and not unbounded["exact"]


def test_plan_refuses_what_it_cannot_plan_in_one_line():
  dino = plan("--config=tests/tiny_config.py:kind=dino", "--devices=2")
  assert dino.returncode == 2
  assert dino.stderr.strip().splitlines()[-1] == (
      "error: the planner knows the contrastive trainer (CLIP, SigLIP, LiT); this config's "
      "trainer is 'dino'")
  uneven = plan(f"--config={TINY}", "--devices=8", "--config.input.batch_size=12")
  assert uneven.returncode == 2
  assert "not divisible by the 8 batch shards" in uneven.stderr.strip().splitlines()[-1]


def test_a_lit_step_from_cached_features_skips_the_image_trunk():
  """With config.image_cache the planned step reads features, not images, and costs less."""
  lit = config_lib.load("tests/tiny_config.py:kind=lit")
  from agriclip_jax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  plain = plan_lib.Planner(lit).step(4)
  lit.image_cache.enabled = True
  cached = plan_lib.Planner(lit).step(4)
  assert cached["batch_bytes"] == 4 * (32 * 4 + 16 * 4 + 4)  # 32 float32 features per image.
  # The towers are the same size here and the locked one only runs forward: a third less.
  assert cached["flops_per_device"] < 0.75 * plain["flops_per_device"]


def test_loss_memory_benchmark_compiles_for_the_devices_it_reports():
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # The benchmark sets its own device count (default 256).
  result = subprocess.run(
      [sys.executable, "-m", "agriclip_jax.benchmarks.loss_memory", "--batches=2048",
       "--losses=softmax", f"--config={TINY}", "--chunk=64"], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(result.stdout)
  assert figures["devices"] == 256
  (row,) = figures["rows"]
  # 8 rows per device: the plain loss holds 8 x 2048 logits, the chunked 8 x 64 at a time.
  assert row["plain_mib"] * 2**20 >= 8 * 2048 * 4 and row["plain_mib"] > row["chunked_mib"]


def test_the_planner_imports_jax_only_after_choosing_simulated_cpu_devices():
  """JAX reads JAX_PLATFORMS when it is imported: were it imported with the planner module,
  a GPU or TPU host would plan on its real accelerator instead of N simulated devices."""
  code = ("import sys, agriclip_jax.plan; "
          "print(sorted(m for m in ('jax', 'flax') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == "[]", result.stdout
