"""Checkpoint round trip (sharded state + data iterator), resume step, mismatch errors."""

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agriclip_jax import checkpointing
from agriclip_jax import sharding
from agriclip_jax.pytree import flatten
from agriclip_jax.trainers import state as state_lib


def _state(mesh, width=8):
  fsdp = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
  replicated = sharding.replicated(mesh)
  state = {"step": jnp.int32(7),
           "params": {"img": {"kernel": jnp.arange(width * 4.0).reshape(width, 4)},
                      "txt": {"bias": jnp.ones(3)}},
           "rng": jax.random.key_data(jax.random.key(3))}
  shardings = {"step": replicated, "rng": replicated,
               "params": {"img": {"kernel": fsdp}, "txt": {"bias": replicated}}}
  return jax.device_put(state, shardings), shardings


def _iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset().batch(4))


def test_round_trip_restores_values_shardings_and_next_batch(tmp_path):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  state, shardings = _state(mesh)
  iterator = _iterator()
  next(iterator), next(iterator)
  checkpoints = checkpointing.Checkpoints(str(tmp_path), max_to_keep=2)
  checkpoints.save(7, state, iterator)
  np.testing.assert_array_equal(next(iterator), [8, 9, 10, 11])
  checkpoints.save(9, state, iterator)
  checkpoints.save(11, state, iterator)
  checkpoints.wait()
  assert checkpoints.latest_step() == 11
  assert state_lib.latest_step(str(tmp_path)) == 11
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [9, 11]

  resumed_iterator = _iterator()
  checkpoints = checkpointing.Checkpoints(str(tmp_path))
  restored = checkpoints.restore(9, checkpointing.abstract(state, shardings), resumed_iterator)
  np.testing.assert_array_equal(next(resumed_iterator), [12, 13, 14, 15])
  for path, value in flatten(restored["params"]).items():
    np.testing.assert_array_equal(value, flatten(state["params"])[path])
    assert value.sharding == flatten(shardings["params"])[path]
  assert int(restored["step"]) == 7


def test_mismatched_checkpoint_is_one_clear_error(tmp_path):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  state, shardings = _state(mesh, width=8)
  checkpoints = checkpointing.Checkpoints(str(tmp_path))
  checkpoints.save(1, state)
  checkpoints.wait()
  other, other_shardings = _state(mesh, width=16)
  other["params"]["extra"] = jnp.zeros(2)
  other_shardings["params"]["extra"] = sharding.replicated(mesh)
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    checkpoints.restore(1, checkpointing.abstract(other, other_shardings))
  message = str(error.value)
  assert "params/img/kernel: checkpoint (8, 4) float32 vs config (16, 4) float32" in message
  assert "params/extra missing from the checkpoint" in message
  assert "\n" not in message


def test_load_params_copies_selected_parameters_from_another_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Workdirs given relative, as in the README's commands.
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  source, _ = _state(mesh)
  source["params"]["img"]["head"] = jnp.full((2,), 5.0)
  writer = checkpointing.Checkpoints(str(tmp_path / "pretrain" / "checkpoints"))
  writer.save(3, source)
  writer.wait()

  target = {"step": jnp.int32(0), "rng": source["rng"],
            "params": {"img": {"kernel": jnp.zeros((8, 4)), "head": jnp.zeros(2)},
                       "txt": {"bias": jnp.zeros(3)}}}
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), target)
  spec = state_lib.StateSpec(init=None, shardings=shardings,
                             abstract=checkpointing.abstract(target, shardings), labels={})
  config = ml_collections.ConfigDict(dict(workdir="{workdir}/pretrain", params="img/.*",
                                          skip="img/head"))
  loaded, paths = state_lib.load_params(config, target, spec, ".")
  assert paths == {"img/kernel"}
  np.testing.assert_array_equal(loaded["params"]["img"]["kernel"],
                                source["params"]["img"]["kernel"])
  np.testing.assert_array_equal(loaded["params"]["img"]["head"], np.zeros(2))  # skipped
  np.testing.assert_array_equal(loaded["params"]["txt"]["bias"], np.zeros(3))  # not selected

  config.params = "txt/.*"  # txt/bias is (3,) in both: fine. Now a shape clash:
  target["params"]["txt"]["bias"] = jnp.zeros(4)
  spec.abstract = checkpointing.abstract(target, shardings)
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r"txt/bias: \(3,\)"):
    state_lib.load_params(config, target, spec, str(tmp_path))


def test_data_state_restores_when_the_process_count_changed(tmp_path):
  """Every process's training-iterator state is the same global position, so a checkpoint
  written by another number of processes still resumes the data exactly."""
  from agriclip_jax.input import pipeline  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh([("data", 8)])
  state, _ = _state(sharding.make_mesh([("data", 2), ("fsdp", 4)]))
  del mesh
  transform = lambda example, rng: {"x": np.int32(example)}
  make = lambda: pipeline.train_iterator([(list(range(50)), transform, 1.0)],
                                         pipeline.Rows(0, 4, 4), seed=0, num_threads=1)
  iterator = make()
  for _ in range(3):
    next(iterator)
  checkpoints = checkpointing.Checkpoints(str(tmp_path))
  checkpoints.save(3, state, iterator)
  checkpoints.wait()
  expected = next(iterator)["x"]
  data_dir = tmp_path / "3" / "data"
  (data_dir / "process_0-of-1.json").rename(data_dir / "process_1-of-2.json")
  resumed = make()
  restored = checkpointing.Checkpoints(str(tmp_path)).restore(
      3, checkpointing.abstract(state, jax.tree.map(lambda x: x.sharding, state)), resumed)
  assert int(restored["step"]) == 7
  np.testing.assert_array_equal(next(resumed)["x"], expected)


def test_a_save_without_room_is_refused_naming_the_intact_checkpoint(tmp_path, monkeypatch):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  state, _ = _state(mesh, width=64)
  needed = checkpointing._process_bytes(state)  # pylint: disable=protected-access
  # 64x4 kernel split over fsdp (each shard once), a bias, step and rng: no replica twice.
  assert needed == 64 * 4 * 4 + 3 * 4 + 4 + 2 * 4
  checkpoints = checkpointing.Checkpoints(str(tmp_path))
  checkpoints.save(4, state, _iterator())
  checkpoints.wait()
  usage = checkpointing.shutil.disk_usage(str(tmp_path))
  monkeypatch.setattr(checkpointing.shutil, "disk_usage",
                      lambda path: usage._replace(free=needed - 1))
  with pytest.raises(checkpointing.CheckpointWriteError,
                     match=rf"not enough space to write checkpoint {tmp_path}/8 \(it needs "
                     rf"about 0.0 MiB, 0.0 MiB are free\); the newest intact checkpoint is "
                     rf"{tmp_path}/4\."):
    checkpoints.save(8, state, _iterator())
  checkpoints.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["4"]  # Nothing half-written.


def test_write_failures_are_recognised_by_their_os_error():
  tensorstore = ValueError('OUT_OF_RANGE: Error writing "params.x/0" in OCDBT database: Failed '
                           "to write 64169 bytes to file 11: No space left on device "
                           "[os_error_code='28']")
  wrapped = RuntimeError("commit failed")
  wrapped.__cause__ = tensorstore
  assert checkpointing.write_cause(wrapped) == "No space left on device"
  assert checkpointing.write_cause(OSError(30, "Read-only file system")) == \
      "Read-only file system"
  assert checkpointing.write_cause(ValueError("shapes do not match")) is None
