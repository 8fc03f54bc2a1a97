"""Test set-up: 8 simulated CPU devices, the repo on sys.path, a small dataset, launch helpers."""

import os
import pathlib
import subprocess
import sys

# Before JAX is imported anywhere: in-process tests see 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# PyTorch's compiler stack (which transformers and open_clip import) loads triton's native
# library, which crashes the process when TensorFlow was loaded before it: load it first.
try:
  import torch._dynamo  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  pass

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding agri_synthetic/small, built once per session."""
  from agriclip_jax.input import datasets  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds"))
  datasets.builder("agri_synthetic/small", path)
  return path


# One XLA compilation cache per test run, shared by its workers, under pytest's temporary root
# (which pytest prunes): the launches of a run compile the same small programs again and again,
# and reading them back saves about a quarter of a launch test's time. A build cache only.
_XLA_CACHE = {}


def _run_root(tmp_path_factory) -> pathlib.Path:
  """The temporary directory of the whole test run, shared by its workers."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # A worker's parent.


@pytest.fixture(scope="session", autouse=True)
def _xla_cache_dir(tmp_path_factory):
  _XLA_CACHE["dir"] = str(_run_root(tmp_path_factory) / "xla-cache")


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> str:
  """The TFDS data dir of the README demos, shared by the workers that run them: the first
  demo builds `agri_synthetic` and the others wait for it (the build holds a file lock)."""
  return str(_run_root(tmp_path_factory) / "demo-tfds")


def _xla_cache_env() -> dict[str, str]:
  if not _XLA_CACHE:
    return {}
  # A size limit turns on JAX's file lock around cache reads and writes (workers share it).
  return {"JAX_COMPILATION_CACHE_DIR": _XLA_CACHE["dir"],
          "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def launch(workdir, config="tests/tiny_config.py:kind=clip", *overrides, data_dir=None,
           devices=1, background=False, timeout=600, extra_env=None, preexec_fn=None):
  """Runs launch.py in a subprocess (own device count); returns CompletedProcess or Popen.

  Launches that run to their end share the test run's compilation cache; background ones
  (which tests kill) and resource-limited ones do not, so no cache entry is ever cut short."""
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if not background and preexec_fn is None:
    env.update(_xla_cache_env())
  if data_dir:
    env["TFDS_DATA_DIR"] = data_dir
  env.update(extra_env or {})
  cmd = [sys.executable, str(REPO / "launch.py"), f"--config={config}",
         f"--workdir={workdir}", *overrides]
  if background:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=preexec_fn)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout, preexec_fn=preexec_fn)


def run_demo(root, name: str, config: str, data_dir: str):
  """Runs a README demo as shipped, with a workdir relative to the repository root as in the
  README's commands; returns (summary, CompletedProcess)."""
  import json  # pylint: disable=g-import-not-at-top
  result = launch(os.path.relpath(root / name, REPO), config, data_dir=data_dir, timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(root, name, "summary.json")) as f:
    return json.load(f), result


def check_held_out_zero_shot(summary, result) -> None:
  """A demo's zero-shot top-1 on its 12 held-out classes is at least 5x chance, and printed."""
  chance = 1 / summary["heldout/num_classes"]
  assert summary["heldout/num_classes"] == 12 and summary["heldout/num_examples"] == 600
  assert summary["heldout/top1"] >= 5 * chance, summary
  assert f"heldout: top-1 {summary['heldout/top1']:.4f} (chance 0.0833)" in result.stdout


# The test files that take longest, longest first. A parallel run (the README's command: one
# worker per file, `--no-loadscope-reorder` so that this order holds) starts them at once
# instead of ending on them; the rest follow in their usual order.
SLOW_FIRST = ("test_demos.py", "test_launch.py", "test_demo_lit.py", "test_agriclip.py",
              "test_eval_suite.py", "test_multiprocess.py", "test_wise.py",
              "test_lit_imported.py", "test_pretrained_init.py", "test_export.py",
              "test_sharding.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # Stable sort.
