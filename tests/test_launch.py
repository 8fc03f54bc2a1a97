"""End-to-end runs through launch.py: train, resume, kill, preempt, bad input."""

import json
import os
import re
import shutil
import signal
import socket
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from agriclip_jax import metric_writer
from agriclip_jax.pytree import flatten
from agriclip_jax.trainers import state as state_lib
from conftest import launch

LONG = ("--config.total_steps=120", "--config.eval_every=120")


def _summary(workdir):
  """The run's final metrics, without wall-clock timings."""
  with open(os.path.join(workdir, "summary.json")) as f:
    return {k: v for k, v in json.load(f).items() if not k.endswith("/seconds")}


def _last_losses(workdir):
  """The last logged loss of each step."""
  return {r["step"]: r["loss"] for r in metric_writer.read_jsonl(workdir) if "loss" in r}


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _wait_for_checkpoint(process, workdir, step, timeout=300):
  start = time.time()
  while state_lib.latest_step(os.path.join(workdir, "checkpoints")) is None or \
      state_lib.latest_step(os.path.join(workdir, "checkpoints")) < step:
    assert process.poll() is None, process.stdout.read()
    assert time.time() - start < timeout, "no checkpoint in time"
    time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted 120-step run."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = launch(workdir, "tests/tiny_config.py:kind=clip", *LONG, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_train_evaluate_checkpoint_log_then_rerun_ends_at_once(data_dir, tmp_path):
  workdir = str(tmp_path)
  result = launch(workdir, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "finished at step 12" in result.stdout
  assert "heldout: top-1" in result.stdout and "(chance 0.0833)" in result.stdout
  summary = _summary(workdir)
  assert summary["step"] == 12 and summary["heldout/num_examples"] == 48
  assert _checkpoint_steps(workdir) == [4, 8, 12]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  logged = metric_writer.read_jsonl(workdir)
  train_record = [r for r in logged if "loss" in r][-1]
  for key in ("logit_scale", "logits/positive", "logits/negative", "img/norm", "txt/norm",
              "lr", "grad_norm", "batch_accuracy/img2txt"):
    assert key in train_record, key

  start = time.time()
  again = launch(workdir, data_dir=data_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout == result.stdout  # Same final report...
  assert len(metric_writer.read_jsonl(workdir)) == len(logged)  # ...and nothing redone.
  assert "already finished" in again.stderr
  assert time.time() - start < 60


def test_sigkill_midway_then_rerun_gives_the_uninterrupted_result(data_dir, tmp_path,
                                                                 reference):
  workdir = str(tmp_path)
  process = launch(workdir, "tests/tiny_config.py:kind=clip", *LONG, data_dir=data_dir,
                   background=True)
  _wait_for_checkpoint(process, workdir, 8)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not os.path.exists(os.path.join(workdir, "summary.json"))  # Really cut short.
  result = launch(workdir, "tests/tiny_config.py:kind=clip", *LONG, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming from" in result.stderr
  assert _summary(workdir) == _summary(reference)
  want, got = _last_losses(reference), _last_losses(workdir)
  assert got.keys() == want.keys()
  np.testing.assert_array_equal([got[s] for s in sorted(got)], [want[s] for s in sorted(want)])


def test_sigterm_saves_a_checkpoint_and_resumes(data_dir, tmp_path, reference):
  workdir = str(tmp_path)
  process = launch(workdir, "tests/tiny_config.py:kind=clip", *LONG, data_dir=data_dir,
                   background=True)
  _wait_for_checkpoint(process, workdir, 4)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 143, output[-3000:]
  assert "preempted: stopped by SIGTERM at step" in output
  stopped_at = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert 4 <= stopped_at < 120 and _checkpoint_steps(workdir)[-1] == stopped_at
  result = launch(workdir, "tests/tiny_config.py:kind=clip", *LONG, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _summary(workdir) == _summary(reference)


def test_non_finite_loss_stops_naming_the_step_and_keeps_good_checkpoints(data_dir,
                                                                         tmp_path):
  workdir = str(tmp_path)
  result = launch(workdir, "tests/tiny_config.py:kind=clip", "--config.optim.lr=1e30",
                  "--config.optim.clip_norm=0", "--config.checkpoint_every=1",
                  "--config.total_steps=50", data_dir=data_dir)
  assert result.returncode == 2, result.stderr[-3000:]
  error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and " at step " in error[0], result.stderr[-3000:]
  bad_step = int(error[0].split(" at step ")[1].split(";")[0])
  steps = _checkpoint_steps(workdir)
  assert steps and max(steps) < bad_step
  losses = _last_losses(workdir)
  assert all(np.isfinite(losses[s]) for s in losses if s < bad_step)


def test_an_update_that_overflows_the_parameters_is_never_saved(data_dir, tmp_path):
  """The loss and gradient norm of a step are those before its update: only a check of the
  state itself keeps a poisoned checkpoint from being saved (and resumed from)."""
  workdir = str(tmp_path)
  result = launch(workdir, "tests/tiny_config.py:kind=clip", "--config.optim.lr=1e39",
                  "--config.checkpoint_every=1", "--config.total_steps=4", data_dir=data_dir)
  assert result.returncode == 2, result.stderr[-3000:]
  error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and "not saved" in error[0], result.stderr[-3000:]
  bad_step = int(error[0].split(" at step ")[1].split(" ")[0])
  assert "Traceback" not in result.stderr
  steps = _checkpoint_steps(workdir) if os.path.isdir(os.path.join(workdir, "checkpoints")) \
      else []
  assert all(step < bad_step for step in steps)
  for step in steps:
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    state = flatten(ocp.PyTreeCheckpointer().restore(path))
    for key, value in state.items():
      if np.issubdtype(np.asarray(value).dtype, np.floating):
        assert np.isfinite(value).all(), (step, key)


def test_a_second_run_on_a_busy_workdir_is_refused_naming_the_first(data_dir, tmp_path):
  workdir = str(tmp_path)
  forever = ("--config.total_steps=100000", "--config.eval_every=100000")
  first = launch(workdir, "tests/tiny_config.py:kind=clip", *forever, data_dir=data_dir,
                 background=True)
  try:
    _wait_for_checkpoint(first, workdir, 4)
    second = launch(workdir, "tests/tiny_config.py:kind=clip", *forever, data_dir=data_dir,
                    timeout=300)
    assert first.poll() is None
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  assert second.returncode == 2, second.stderr[-3000:]
  error = [line for line in second.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and "is in use by another run" in error[0], second.stderr[-3000:]
  assert f"pid {first.pid} on {socket.gethostname()}, started " in error[0]
  assert "Traceback" not in second.stderr


def test_resuming_with_another_trajectory_needs_consent_and_keeps_both_configs(data_dir,
                                                                              tmp_path):
  workdir = str(tmp_path)
  result = launch(workdir, "tests/tiny_config.py:kind=clip", "--config.total_steps=4",
                  data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "config.json")) as f:
    lr = json.load(f)["optim"]["lr"]
  changed = ("--config.total_steps=8", f"--config.optim.lr={2 * lr}", "--config.log_every=1",
             "--config.input.num_threads=1")
  result = launch(workdir, "tests/tiny_config.py:kind=clip", *changed, data_dir=data_dir)
  assert result.returncode == 2, result.stderr[-3000:]
  error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1, result.stderr[-3000:]
  assert "total_steps: 4 -> 8" in error[0] and f"optim.lr: {lr} -> {2 * lr}" in error[0]
  assert "log_every" not in error[0] and "num_threads" not in error[0]  # Not trajectory.
  assert "--config.allow_config_change=True" in error[0]
  assert "Traceback" not in result.stderr
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["total_steps"] == 4  # Untouched by the refused run.

  result = launch(workdir, "tests/tiny_config.py:kind=clip", *changed,
                  "--config.allow_config_change=True", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "finished at step 8" in result.stdout
  with open(os.path.join(workdir, "config.4.json")) as f:
    old = json.load(f)
  with open(os.path.join(workdir, "config.json")) as f:
    new = json.load(f)
  assert (old["total_steps"], old["optim"]["lr"]) == (4, lr)
  assert (new["total_steps"], new["optim"]["lr"]) == (8, 2 * lr)


def test_resume_drops_the_metrics_of_the_steps_it_trains_again(data_dir, tmp_path):
  workdir = str(tmp_path)
  result = launch(workdir, "tests/tiny_config.py:kind=clip", "--config.total_steps=8",
                  data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  logged = metric_writer.read_jsonl(workdir)
  # As if killed after step 8 was logged and evaluated but before its checkpoint was written.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
  os.remove(os.path.join(workdir, "summary.json"))
  result = launch(workdir, "tests/tiny_config.py:kind=clip", "--config.total_steps=8",
                  data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming from" in result.stderr
  relogged = metric_writer.read_jsonl(workdir)
  assert [r["step"] for r in relogged] == [r["step"] for r in logged]  # No step twice.
  assert [sorted(r) for r in relogged] == [sorted(r) for r in logged]


def test_lit_locks_the_pretrained_image_tower(data_dir, tmp_path):
  workdir = str(tmp_path)
  result = launch(workdir, "tests/tiny_config.py:kind=lit", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "heldout: top-1" in result.stdout
  assert _summary(os.path.join(workdir, "image_tower"))["step"] == 12

  def params(run):
    path = os.path.join(run, "checkpoints", "12", "state")
    return flatten(ocp.PyTreeCheckpointer().restore(path)["params"])

  pretrained, lit = params(os.path.join(workdir, "image_tower")), params(workdir)
  trunk = [k for k in lit if k.startswith("img/") and not k.startswith("img/head/")]
  assert len(trunk) > 10
  for key in trunk:  # Copied from the pretrained run and never changed.
    assert np.asarray(lit[key]).tobytes() == np.asarray(pretrained[key]).tobytes(), key
  assert lit["img/head/kernel"].shape != pretrained["img/head/kernel"].shape


def test_mismatched_checkpoint_is_one_line(data_dir, tmp_path):
  workdir = str(tmp_path)
  assert launch(workdir, "tests/tiny_config.py:kind=clip", "--config.total_steps=4",
                data_dir=data_dir).returncode == 0
  result = launch(workdir, "tests/tiny_config.py:kind=clip", "--config.total_steps=8",
                  "--config.model.out_dim=48", "--config.allow_config_change=True",
                  data_dir=data_dir)
  assert result.returncode == 2
  error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and "does not match the config" in error[0]
  assert "params/img/head/kernel: checkpoint (32, 32) float32 vs config (32, 48)" in error[0]


@pytest.mark.parametrize("args,message", [
    (("--config=tests/tiny_config.py:kind=pretrain", "--config.evals.test.type=zeroshot"),
     "zero-shot evaluation needs a text tower"),
    (("--config.optim.lrr=1",), "error: unknown config field 'optim.lrr' (did you mean 'lr'?)"),
    (("--config.input.dataset=no_such_set",), "error: unknown dataset 'no_such_set'"),
    (("--config.evals.heldout.split=validation",), "has no split 'validation'"),
    (("--config.input.batch_size=0",), "config.input.batch_size must be at least 1"),
    (("--config.mesh=[(data, 2)]",), "--config.mesh=[(data, 2)]: expected a Python list literal"),
    (("--config.optim.decay_regex=(",), "optim.decay_regex: invalid regular expression"),
    (("--config.input.text_key=caption",), "input.text_key='caption': agri_synthetic/small"),
    (("--config.input.image_size=36",), "image size 36x36 is not a multiple of the ViT patch"),
    (("--config.loss_targets=labels", "--config.input.label_key=species"),
     "config.loss_targets='labels': input.label_key='species': agri_synthetic/small/1.1.0 has"),
    (("--config.evals.heldout.type=classification", "--config.evals.heldout.templates=",
      "--config.evals.heldout.class_texts="),
     "evaluators of type 'classification' have fields"),
])
def test_bad_input_is_one_error_line(data_dir, tmp_path, args, message):
  config = "tests/tiny_config.py:kind=clip"
  if args[0].startswith("--config="):
    config, args = args[0][len("--config="):], args[1:]
  result = launch(str(tmp_path), config, *args, data_dir=data_dir)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_a_file_where_the_workdir_should_be_is_one_line(tmp_path):
  workdir = tmp_path / "results"
  workdir.write_text("")
  result = launch(str(workdir), "tests/tiny_config.py:kind=clip,steps=2")
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: workdir {workdir} is a file, not a directory"], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_mesh_and_sharding_rules_are_overridable_as_list_literals(data_dir, tmp_path):
  mesh, rules = '[("data", -1), ("fsdp", 2)]', '[("img/.*", "fsdp"), (".*", "replicate")]'
  result = launch(str(tmp_path), "tests/tiny_config.py:kind=clip,steps=2", "--config.mesh=" + mesh,
                  "--config.sharding_rules=" + rules, data_dir=data_dir, devices=2)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Mesh {'data': 1, 'fsdp': 2} over 2 devices" in result.stderr
  with open(os.path.join(tmp_path, "config.json")) as f:
    stored = json.load(f)
  assert stored["mesh"] == [["data", -1], ["fsdp", 2]]
  assert stored["sharding_rules"] == [["img/.*", "fsdp"], [".*", "replicate"]]


def test_frozen_tower_without_pretrained_weights_is_refused(data_dir, tmp_path):
  result = launch(str(tmp_path), "tests/tiny_config.py:kind=lit", "--config.init.workdir=",
                  data_dir=data_dir)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "frozen parameters (e.g. img/" in errors[0], result.stderr[-2000:]


def _with_undecodable_images(data_dir, destination, every=8):
  """A copy of data_dir whose agri_synthetic/small train split has every `every`-th image
  truncated after the build (as a file damaged on disk later would be)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shutil.copytree(data_dir, destination)
  split_dir = os.path.join(destination, "agri_synthetic", "small")
  version = os.listdir(split_dir)[0]
  [path] = [os.path.join(split_dir, version, f) for f in os.listdir(os.path.join(
      split_dir, version)) if f.startswith("agri_synthetic-train.array_record")]
  reader = array_record_module.ArrayRecordReader(path)
  records = reader.read_all()
  reader.close()
  damaged = []
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for i, record in enumerate(records):
    if i % every == 0:
      example = tf.train.Example.FromString(record)
      image = example.features.feature["image"].bytes_list.value
      image[0] = image[0][:len(image[0]) // 3]
      damaged.append(example.features.feature["id"].bytes_list.value[0].decode())
      record = example.SerializeToString()
    writer.write(record)
  writer.close()
  return damaged


def test_undecodable_training_images_are_replaced_counted_and_limited(data_dir, tmp_path):
  damaged_dir = str(tmp_path / "tfds")
  damaged = _with_undecodable_images(data_dir, damaged_dir)
  tolerant = launch(str(tmp_path / "tolerant"), "tests/tiny_config.py:kind=clip",
                    "--config.input.max_undecodable_rate=0.5", data_dir=damaged_dir)
  assert tolerant.returncode == 0, tolerant.stderr[-3000:]
  named = re.findall(r"training example (\S+): cannot decode image .*; the next example of "
                     "the stream takes its place", tolerant.stderr)
  assert named and set(named) <= set(damaged)
  counted = [r["input/undecodable"] for r in metric_writer.read_jsonl(str(tmp_path / "tolerant"))
             if "input/undecodable" in r]
  # 6 log lines over 12 steps of 16 examples, one in 8 of them damaged.
  assert len(counted) == 6 and 10 < sum(counted) < 40
  strict = launch(str(tmp_path / "strict"), "tests/tiny_config.py:kind=clip", data_dir=damaged_dir)
  assert strict.returncode == 2
  errors = [line for line in strict.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "could not be decoded, more than config.input.max_undecodable=10" \
      in errors[0], strict.stderr[-2000:]
  assert "Traceback" not in strict.stderr


def _file_size_limit(limit_bytes):
  """For a child process: writes past `limit_bytes` in any one file fail with EFBIG (as on a
  full disk a write fails with ENOSPC), instead of killing the process."""
  import resource  # pylint: disable=g-import-not-at-top

  def apply():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

  return apply


def test_a_checkpoint_that_cannot_be_written_is_one_line(data_dir, tmp_path):
  result = launch(str(tmp_path), "tests/tiny_config.py:kind=clip", "--config.total_steps=8",
                  "--config.checkpoint_every=4", data_dir=data_dir,
                  preexec_fn=_file_size_limit(60 * 1024))
  assert result.returncode == 2
  assert result.stderr.count("\nerror:") + result.stderr.startswith("error:") == 1
  [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert error == (f"error: writing checkpoint {tmp_path}/checkpoints/4 failed: File too large; "
                   "no earlier checkpoint exists"), result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "Error writing" not in result.stderr
