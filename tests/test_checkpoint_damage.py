"""Damaged checkpoints: found by their manifest, moved aside, and the run resumes before them."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agriclip_jax import checkpointing
from agriclip_jax import sharding
from agriclip_jax.trainers import state as state_lib
from conftest import launch

CONFIG = "tests/tiny_config.py:kind=clip,steps=16"
EVERY = ("--config.checkpoint_every=4", "--config.keep_checkpoints=4")


def _largest(directory):
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest(os.path.join(step_dir, "state"))
  os.truncate(path, os.path.getsize(path) // 2)


def _flip_bytes(step_dir):  # Same size: only the checksum can tell.
  path = _largest(os.path.join(step_dir, "state"))
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(16)
    f.seek(-len(chunk), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _delete_manifests(step_dir):
  for root, _, names in os.walk(os.path.join(step_dir, "state")):
    for name in names:
      if name == "manifest.ocdbt":
        os.remove(os.path.join(root, name))


def _garbage_data_json(step_dir):
  with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
    f.write("{garbage")


DAMAGES = {
    "truncated_chunk": _truncate,
    "no_metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "no_ocdbt_manifests": _delete_manifests,
    "garbage_data_json": _garbage_data_json,
    "no_state": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "flipped_bytes": _flip_bytes,
}


# One resume per group: its damages hit checkpoints 16, 12 and 8 (one kind each), and the run
# moves all three aside, newest first, and resumes from 4. Flipped bytes keep every size, so
# only the restore's checksums find them (loaders, checking sizes, still see step 8).
GROUPS = [("truncated_chunk", "no_metadata", "no_ocdbt_manifests"),
          ("garbage_data_json", "no_state", "flipped_bytes")]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A finished 16-step run with checkpoints at steps 4, 8, 12 and 16, shared by the cases
  (copied)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  result = launch(workdir, CONFIG, *EVERY, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.parametrize("kinds", GROUPS, ids="+".join)
def test_damaged_latest_checkpoints_are_moved_aside_and_the_run_resumes_before_them(
    kinds, trained, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  os.remove(os.path.join(workdir, "summary.json"))  # As if stopped in the final evaluation.
  checkpoints = os.path.join(workdir, "checkpoints")
  for step, kind in zip((16, 12, 8), kinds):
    DAMAGES[kind](os.path.join(checkpoints, str(step)))
  # Loaders skip them too, by their files and sizes (checksums are checked on restore only).
  assert state_lib.latest_step(checkpoints) == (8 if "flipped_bytes" in kinds else 4)

  result = launch(workdir, CONFIG, *EVERY, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if "moved aside" in line]
  assert len(lines) == 3, result.stderr[-3000:]
  for line, step in zip(lines, (16, 12, 8)):
    assert f"{checkpoints}/{step} is damaged" in line
    assert f"moved aside to {checkpoints}/{step}.damaged" in line
    assert os.path.isdir(os.path.join(checkpoints, f"{step}.damaged"))
  assert f"Resuming from {checkpoints}/4" in result.stderr
  assert "finished at step 16" in result.stdout
  assert checkpointing.damage(os.path.join(checkpoints, "16")) is None  # Written again.
  assert state_lib.latest_step(checkpoints) == 16


def test_checkpoints_get_a_manifest_and_one_without_is_restored_with_a_warning(
    tmp_path, caplog):
  mesh = sharding.make_mesh([("data", 8)])
  replicated = sharding.replicated(mesh)
  state = jax.device_put({"step": jnp.int32(3), "w": jnp.arange(6.0)}, replicated)
  checkpoints = checkpointing.Checkpoints(str(tmp_path))
  checkpoints.save(2, state)
  checkpoints.save(3, state)
  checkpoints.close()
  for step in (2, 3):
    with open(tmp_path / str(step) / checkpointing.MANIFEST) as f:
      assert "state/_METADATA" in json.load(f)["files"]

  os.remove(tmp_path / "3" / checkpointing.MANIFEST)  # As written before manifests existed.
  checkpoints = checkpointing.Checkpoints(str(tmp_path))
  assert checkpoints.restorable_step() == 3
  warnings = [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()]
  assert len(warnings) == 1 and f"{tmp_path}/3 has no verified.json" in warnings[0]
  restored = checkpoints.restore(3, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state))
  np.testing.assert_array_equal(restored["w"], np.arange(6.0))
  checkpoints.close()
