"""WiSE-FT: weight-space mixes of a fine-tuned run with the run it started from, evaluated over
the suite at several alphas and exported."""

import json

import jax
import numpy as np
import pytest

from agriclip_jax import config_lib
from agriclip_jax import export
from agriclip_jax import runs
from agriclip_jax import sharding
from agriclip_jax.input import datasets
from agriclip_jax.models.exporters import common
from agriclip_jax.models.exporters import native
from conftest import launch
from data.agri_synthetic import spec as spec_lib


def _run(params, name):
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)], jax.local_devices())
  shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()), params)
  return runs.Run(name, None, 1, jax.device_put(params, shardings), shardings, 32,
                  lambda p, x: x)


def test_interpolation_matches_numpy_and_refuses_other_shapes():
  rng = np.random.default_rng(0)
  base = {"img": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
          "logit_scale": np.float32(2.0)}
  tuned = {"img": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
           "logit_scale": np.float32(3.0)}
  for alpha in (0.0, 0.3, 1.0):
    mixed = runs.interpolate(_run(base, "b"), _run(tuned, "t"), alpha)
    np.testing.assert_allclose(np.asarray(mixed.params["img"]["w"]),
                               (1 - alpha) * base["img"]["w"] + alpha * tuned["img"]["w"],
                               rtol=1e-6, atol=1e-7)
    assert float(mixed.params["logit_scale"]) == pytest.approx(2.0 + alpha)
  assert (runs.interpolate(_run(base, "b"), _run(tuned, "t"), 0.3).key
          != runs.interpolate(_run(base, "b"), _run(tuned, "t"), 0.7).key)  # Own caches.
  other = {"img": {"w": np.zeros((3, 5), np.float32)}, "logit_scale": np.float32(0)}
  with pytest.raises(config_lib.ConfigError, match=r"img/w \(3, 4\) vs \(3, 5\)"):
    runs.interpolate(_run(base, "b"), _run(other, "o"), 0.5)


def test_wise_sweep_over_the_suite_and_export_of_a_mix(data_dir, tmp_path, capsys):
  base, tuned = tmp_path / "base", tmp_path / "tuned"
  result = launch(base, "tests/tiny_config.py:kind=clip,steps=4", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  result = launch(tuned, "tests/tiny_config.py:kind=clip,steps=4", f"--config.init.workdir={base}",
                  "--config.seed=7", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  # Both jobs evaluate two of the held-out classes only (a class subset of the split).
  held_out = [i for i, c in enumerate(spec_lib.classes()) if c.held_out][:2]
  subset = (f"--config.datasets.heldout.classes={held_out[0]},{held_out[1]}",
            "--config.datasets.heldout.drop_other_classes=True")
  plain = tmp_path / "plain"
  result = launch(plain, "tests/tiny_config.py:kind=eval_heldout",
                  f"--config.checkpoints={base},{tuned}", "--config.names=base,tuned",
                  *subset, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  sweep = tmp_path / "sweep"
  result = launch(sweep, "tests/tiny_config.py:kind=eval_heldout",
                  f"--config.checkpoints={tuned}", "--config.names=tuned",
                  f"--config.wise.base={base}", "--config.wise.alphas=0,0.5,1",
                  *subset, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  plain_results = json.loads((plain / "results.json").read_text())
  sweep_results = json.loads((sweep / "results.json").read_text())
  metric = "zeroshot/top1"
  heldout = datasets.data_source(datasets.builder("agri_synthetic/small", data_dir), "heldout")
  count = sum(int(heldout[i]["label"]) in held_out for i in range(len(heldout)))
  assert 0 < count < len(heldout)
  assert plain_results["base"]["heldout"]["zeroshot/num_examples"] == count
  assert plain_results["base"]["heldout"]["zeroshot/num_classes"] == 2
  # alpha 0 is the base run, alpha 1 the fine-tuned one.
  assert sweep_results["tuned@0"]["heldout"][metric] == pytest.approx(
      plain_results["base"]["heldout"][metric], abs=1e-6)
  assert sweep_results["tuned@1"]["heldout"][metric] == pytest.approx(
      plain_results["tuned"]["heldout"][metric], abs=1e-6)
  wise = json.loads((sweep / "wise.json").read_text())
  assert wise["alphas"] == [0, 0.5, 1] and wise["metric"] == metric
  assert wise["curves"]["tuned"]["heldout"] == [
      sweep_results[f"tuned@{a}"]["heldout"][metric] for a in ("0", "0.5", "1")]
  assert (sweep / "plots" / "wise_tuned.png").stat().st_size > 0

  code = export.main(["--workdir", str(tuned), "--wise-base", str(base), "--alpha", "0.25",
                      "--out", str(tmp_path / "mix"), "--format", "native"])
  assert code == 0, capsys.readouterr().err
  _, mixed = native.load(str(tmp_path / "mix"))
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)], jax.local_devices())
  flat_base = common.flatten(jax.device_get(runs.load(str(base), mesh).params))
  flat_tuned = common.flatten(jax.device_get(runs.load(str(tuned), mesh).params))
  assert any(not np.array_equal(flat_base[k], flat_tuned[k]) for k in flat_base)
  for key, value in mixed.items():
    np.testing.assert_allclose(value, 0.75 * flat_base[key] + 0.25 * flat_tuned[key],
                               rtol=1e-6, atol=1e-7, err_msg=key)
