"""Two JAX processes on 127.0.0.1 (gloo collectives) train exactly like one process."""

import socket

import numpy as np

from agriclip_jax import metric_writer
from conftest import launch


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _records(workdir):
  train = {r["step"]: r for r in metric_writer.read_jsonl(workdir) if "loss" in r}
  evals = [r for r in metric_writer.read_jsonl(workdir) if "heldout/top1" in r]
  return train, evals[-1]


def test_two_processes_match_one_process(data_dir, tmp_path):
  port = _free_port()
  two = str(tmp_path / "two")
  coordinator = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  processes = [launch(two, "tests/tiny_config.py:kind=clip", *coordinator,
                      f"--process_id={i}", data_dir=data_dir, devices=2, background=True)
               for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "Process 1 of 2" in outputs[1]

  one = str(tmp_path / "one")
  result = launch(one, "tests/tiny_config.py:kind=clip", data_dir=data_dir, devices=4)
  assert result.returncode == 0, result.stderr[-3000:]

  train_two, eval_two = _records(two)
  train_one, eval_one = _records(one)
  assert sorted(train_two) == sorted(train_one) == [2, 4, 6, 8, 10, 12]
  for step in train_one:
    np.testing.assert_allclose(train_two[step]["loss"], train_one[step]["loss"], rtol=1e-5)
    np.testing.assert_allclose(train_two[step]["logit_scale"], train_one[step]["logit_scale"],
                               rtol=1e-5)
  for key in ("heldout/top1", "heldout/top5", "test/top1", "heldout/num_examples"):
    assert eval_two[key] == eval_one[key], key


def test_two_processes_build_one_image_cache_and_train_like_one_process(data_dir, tmp_path):
  """LiT from cached features: both processes embed their rows of every cache batch, process
  0 writes the cache and both train from it, as one process does."""
  port = _free_port()
  cache = ["--config.image_cache.enabled=True", "--config.image_cache.views=1",
           "--config.image_cache.shard_size=256"]
  two = str(tmp_path / "two")
  coordinator = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  processes = [launch(two, "tests/tiny_config.py:kind=lit", *cache, *coordinator,
                      f"--config.image_cache.dir={tmp_path / 'cache_two'}",
                      f"--process_id={i}", data_dir=data_dir, devices=2, background=True)
               for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
    assert "Image cache: shard 3 of 3 written" in out  # 720 examples in shards of 256.
  assert len(list((tmp_path / "cache_two").glob("*/meta.json"))) == 1

  one = str(tmp_path / "one")  # Locks the same tower (not trained again).
  result = launch(one, "tests/tiny_config.py:kind=lit", *cache,
                  f"--config.image_cache.dir={tmp_path / 'cache_one'}", "--config.requires=[]",
                  f"--config.init.workdir={two}/image_tower", data_dir=data_dir, devices=4)
  assert result.returncode == 0, result.stderr[-3000:]
  features = {name: [np.load(p) for p in sorted((tmp_path / name).glob("*/features-*.npy"))]
              for name in ("cache_two", "cache_one")}
  assert len(features["cache_two"]) == len(features["cache_one"]) == 3
  for got, want in zip(features["cache_two"], features["cache_one"]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  train_two, eval_two = _records(two)
  train_one, eval_one = _records(one)
  assert sorted(train_two) == sorted(train_one) == [2, 4, 6, 8, 10, 12]
  for step in train_one:
    np.testing.assert_allclose(train_two[step]["loss"], train_one[step]["loss"], rtol=1e-5)
  assert eval_two["heldout/num_examples"] == eval_one["heldout/num_examples"]
