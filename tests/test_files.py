"""A workdir's files go through etils.epath, so a `gs://` workdir works like a local one.

The object-store tests map `gs://bucket/...` onto a local directory with epath's own mock, in a
working directory of their own: code that bypassed epath (os.path, open, np.save) would write
a local `gs:` directory or fail, and the mapped directory would not hold the files. What these
tests cannot reach is Orbax's TensorStore array I/O, which has its own GCS driver.
"""

import builtins
import json
import os

from clu import metric_writers
from etils import epath
import ml_collections
import numpy as np
import pytest

from agriclip_jax import checkpointing
from agriclip_jax import files
from agriclip_jax import metric_writer
from agriclip_jax import results as results_lib
from agriclip_jax import runs
from agriclip_jax import workdir_lock
from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.trainers import common
from agriclip_jax.trainers import loop
from agriclip_jax.trainers import state as state_lib

BUCKET = "gs://bucket"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """(the local directory that stands for gs://bucket, the calls the mock served)."""
  local = tmp_path / "bucket"
  local.mkdir()
  work = tmp_path / "cwd"
  work.mkdir()
  monkeypatch.chdir(work)
  calls = []

  def to_local(p):
    p = os.fspath(p)
    if p.startswith(BUCKET):
      calls.append(p)
      return str(local) + p[len(BUCKET):]
    return p

  def to_bucket(p):
    p = os.fspath(p)
    return BUCKET + p[len(str(local)):] if p.startswith(str(local)) else p

  def mapped(fn, path, *args, **kwargs):
    return fn(to_local(path), *[to_local(a) for a in args], **kwargs)

  def walk(fn, top, **kwargs):
    for root, dirs, names in fn(to_local(top), **kwargs):
      yield to_bucket(root), dirs, names

  def glob(fn, pattern):
    return [to_bucket(p) for p in fn(to_local(pattern))]

  # epath prefers TensorFlow's gs:// support whenever TensorFlow is installed, past its mock.
  monkeypatch.setattr(epath.gpath, "_is_tf_installed", lambda: False)
  # Reads that bypass epath fail loudly instead of quietly seeing nothing.
  for module, name in ((builtins, "open"), (os.path, "exists"), (os.path, "isfile"),
                       (os.path, "isdir"), (os, "listdir"), (os, "makedirs")):
    monkeypatch.setattr(module, name, _refusing_urls(getattr(module, name)))
  ops = ("copy", "exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
         "rename", "replace", "rmtree", "stat")
  with epath.testing.mock_epath(walk=walk, glob=glob, **{op: mapped for op in ops}):
    yield local, calls
  assert not (work / "gs:").exists(), "something wrote gs:// paths to the local disk"


def _refusing_urls(fn):
  def refusing(p, *args, **kwargs):
    if isinstance(p, str) and p.startswith(BUCKET):
      raise AssertionError(f"{fn.__name__}({p!r}) bypassed epath")
    return fn(p, *args, **kwargs)
  return refusing


def test_atomic_writes_leave_no_temporary_file_and_read_back(tmp_path):
  files.write_json(tmp_path / "a.json", {"x": [1, 2]})
  files.write_atomic(tmp_path / "b.bin", b"\x00\x01")
  assert files.read_json(tmp_path / "a.json") == {"x": [1, 2]}
  assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
  assert sorted(os.listdir(tmp_path)) == ["a.json", "b.bin"]
  with pytest.raises(FileNotFoundError):
    files.read_json(tmp_path / "missing.json")


def test_arrays_round_trip_and_local_ones_are_memory_mapped(tmp_path):
  array = np.arange(12, dtype=np.float32).reshape(3, 4)
  files.save_array(tmp_path / "a.npy", array)
  loaded = files.load_array(str(tmp_path / "a.npy"))
  assert isinstance(loaded, np.memmap) and np.array_equal(loaded, array)
  files.save_arrays(tmp_path / "b.npz", W=array, b=array[0])
  both = files.load_arrays(tmp_path / "b.npz")
  assert np.array_equal(both["W"], array) and np.array_equal(both["b"], array[0])


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_line_log_appends_survives_reopening_and_replaces_lines(where, tmp_path, request):
  if where == "bucket":
    local, _ = request.getfixturevalue("bucket")
    path, on_disk = f"{BUCKET}/m.jsonl", local / "m.jsonl"
  else:
    path = on_disk = tmp_path / "m.jsonl"
  log = files.LineLog(path)
  log.write("1\n")
  log.write("2\n")
  log.flush()
  assert on_disk.read_text() == "1\n2\n"
  log.close()
  log = files.LineLog(path)  # A resumed run appends to what is there.
  log.write("3\n")
  assert log.lines() == ["1\n", "2\n", "3\n"]
  log.replace_lines(["1\n"])
  log.write("4\n")
  log.close()
  assert on_disk.read_text() == "1\n4\n"


def test_a_runs_files_in_a_bucket_land_in_the_bucket(bucket, monkeypatch):
  local, calls = bucket
  workdir = f"{BUCKET}/run"
  workdir_lock.create(workdir)
  with workdir_lock.hold(workdir):  # No lock on an object store: runs, with a warning.
    pass
  assert (local / "run").is_dir() and not list((local / "run").iterdir())

  # config.json, kept as config.<step>.json when a resumed run's config changes.
  config = ml_collections.ConfigDict({"trainer": "contrastive", "total_steps": 4,
                                      "allow_config_change": True})
  common.save_config(config, workdir)
  assert json.loads((local / "run" / "config.json").read_text())["total_steps"] == 4

  # Checkpoint manifests and look-ups (the arrays themselves are Orbax's).
  step_dir = local / "run" / "checkpoints" / "4" / "state"
  step_dir.mkdir(parents=True)
  (step_dir / "data").write_bytes(b"abc")
  checkpointing.write_manifest(f"{workdir}/checkpoints/4")
  assert json.loads((step_dir.parent / checkpointing.MANIFEST).read_text()) == {
      "files": {"state/data": [3, 891568578]}}
  assert state_lib.latest_step(f"{workdir}/checkpoints") == 4
  (step_dir / "data").write_bytes(b"abd")
  assert "differs from what was written" in checkpointing.damage(f"{workdir}/checkpoints/4")
  (step_dir / "data").write_bytes(b"abc")

  config.total_steps = 8
  common.save_config(config, workdir)
  assert json.loads((local / "run" / "config.4.json").read_text())["total_steps"] == 4
  assert json.loads((local / "run" / "config.json").read_text())["total_steps"] == 8

  # Metrics (TensorBoard's event files go through TensorFlow's own gs:// support).
  monkeypatch.setattr(metric_writers, "create_default_writer",
                      lambda *a, **k: metric_writers.MultiWriter([]))
  writer = metric_writer.Writer(workdir)
  writer.write(1, {"loss": 2.0})
  writer.write(2, {"loss": 1.0})
  writer.drop_after(1)
  writer.close()
  assert metric_writer.read_jsonl(workdir) == [{"step": 1, "loss": 2.0}]

  # Summary and evaluation results.
  loop.write_summary(workdir, {"step": 4, "loss": 1.5})
  assert loop.finished_summary(workdir, 4) == {"step": 4, "loss": 1.5}
  results = {"ckpt": {"set": {"zeroshot/top1": 0.5}}}
  results_lib.write(workdir, results)
  assert results_lib.read(workdir) == results
  assert "| set | 50.0 |" in (local / "run" / "results.md").read_text()
  files.path(f"{workdir}/cache").mkdir(parents=True, exist_ok=True)
  files.save_array(f"{workdir}/cache/f.npy", np.ones(3, np.float32))
  assert np.array_equal(files.load_array(f"{workdir}/cache/f.npy"), np.ones(3))
  assert sorted(p.name for p in (local / "run").iterdir()) == [
      "cache", "checkpoints", "config.4.json", "config.json", "metrics.jsonl", "results.csv",
      "results.json", "results.md", "summary.json"]
  assert len(calls) > 20  # The mock served them.


def test_a_runs_tokenizer_and_aligner_in_a_bucket_read_back(bucket):
  local, _ = bucket
  workdir = f"{BUCKET}/run"
  files.path(workdir).mkdir(parents=True, exist_ok=True)
  bpe = tokenizer_lib.train_bpe(["a green spotted leaf", "a red striped fish"] * 20, 300)
  tokenizer = tokenizer_lib.from_trained(bpe, max_len=8)
  tokenizer.save(workdir)
  assert (local / "run" / "tokenizer.json").exists()
  again = tokenizer_lib.load(workdir)
  texts = ["a green leaf", "a striped fish"]
  assert np.array_equal(again.encode(texts), tokenizer.encode(texts))
  weights, bias = np.eye(3, dtype=np.float32), np.arange(3, dtype=np.float32)
  files.save_arrays(files.join(workdir, runs.ALIGNER), W=weights, b=bias)
  config = ml_collections.ConfigDict({"align": {"aligner_workdir": ""}})
  w, b, path = runs.load_aligner(config, workdir)
  assert path == f"{workdir}/{runs.ALIGNER}"
  assert np.array_equal(w, weights) and np.array_equal(b, bias)
