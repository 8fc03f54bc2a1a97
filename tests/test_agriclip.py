"""AgriCLIP's pieces: DINO loss and centering vs numpy, EMA, the aligner, k-NN voting."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agriclip_jax import optim
from agriclip_jax.evaluators import knn
from agriclip_jax.input import preprocess
from agriclip_jax.losses import dino as dino_loss
from agriclip_jax.models import aligner
from agriclip_jax.models import dino as dino_model
import fixtures
import importer_utils


def numpy_dino_loss(student, teacher, center, student_temp, teacher_temp):
  def softmax(x):
    x = x - x.max(-1, keepdims=True)
    return np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  total, pairs = 0.0, 0
  for i, t in enumerate(teacher):
    q = softmax((t.astype(np.float64) - center) / teacher_temp)
    for v, s in enumerate(student):
      if v == i:
        continue
      log_p = np.log(softmax(s.astype(np.float64) / student_temp))
      total += np.mean(np.sum(-q * log_p, axis=-1))
      pairs += 1
  return total / pairs


@pytest.mark.parametrize("num_local", [0, 3])
def test_dino_loss_matches_numpy(num_local):
  rng = np.random.default_rng(0)
  teacher = [rng.normal(size=(6, 16)).astype(np.float32) for _ in range(2)]
  student = [rng.normal(size=(6, 16)).astype(np.float32) for _ in range(2 + num_local)]
  center = rng.normal(size=16).astype(np.float32) * 0.1
  got = dino_loss.loss(student, teacher, center, 0.1, 0.04)
  np.testing.assert_allclose(got, numpy_dino_loss(student, teacher, center, 0.1, 0.04),
                             rtol=1e-5)


def test_dino_loss_gradient_flows_to_the_student_only():
  rng = np.random.default_rng(1)
  teacher = [jnp.asarray(rng.normal(size=(4, 8)), jnp.float32) for _ in range(2)]
  student = [jnp.asarray(rng.normal(size=(4, 8)), jnp.float32) for _ in range(3)]
  grad_t = jax.grad(lambda t: dino_loss.loss(student, t, jnp.zeros(8), 0.1, 0.04))(teacher)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grad_t)
  grad_s = jax.grad(lambda s: dino_loss.loss(s, teacher, jnp.zeros(8), 0.1, 0.04))(student)
  assert all(float(jnp.abs(g).max()) > 0.0 for g in grad_s)


def test_center_update_and_ema_are_exact():
  rng = np.random.default_rng(2)
  teacher = [rng.normal(size=(5, 7)).astype(np.float32) for _ in range(2)]
  center = rng.normal(size=7).astype(np.float32)
  want = 0.9 * center + 0.1 * np.concatenate(teacher).mean(0)
  np.testing.assert_allclose(dino_loss.update_center(center, teacher, 0.9), want, rtol=1e-6)
  t = {"a": jnp.asarray([1.0, 2.0]), "b": {"c": jnp.asarray(4.0)}}
  s = {"a": jnp.asarray([3.0, 6.0]), "b": {"c": jnp.asarray(0.0)}}
  out = dino_loss.ema(t, s, 0.75)
  np.testing.assert_array_equal(out["a"], [1.5, 3.0])
  np.testing.assert_array_equal(out["b"]["c"], 3.0)


def test_dino_schedules():
  momentum = optim.cosine(0.996, 1.0, 100)
  np.testing.assert_allclose([momentum(0), momentum(50), momentum(100), momentum(150)],
                             [0.996, 0.998, 1.0, 1.0], rtol=1e-6)
  temp = optim.warmup_then_constant(0.04, 0.07, 10)
  np.testing.assert_allclose([temp(0), temp(5), temp(10), temp(99)], [0.04, 0.055, 0.07, 0.07],
                             rtol=1e-6)


def test_weight_normalised_last_layer_has_unit_columns():
  head = dino_model.Head(out_dim=12, hidden_dim=16, bottleneck_dim=8, num_layers=2)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 5)), jnp.float32)
  params = head.init(jax.random.key(0), x)["params"]
  assert set(params["last_layer"]) == {"kernel"}  # norm_last_layer: no learned scale
  scaled = jax.tree.map(lambda p: p, params)
  scaled["last_layer"]["kernel"] = params["last_layer"]["kernel"] * 7.0
  np.testing.assert_allclose(head.apply({"params": params}, x),
                             head.apply({"params": scaled}, x), rtol=1e-5)
  # Outputs are cosines between the unit bottleneck and unit prototypes.
  assert float(jnp.abs(head.apply({"params": params}, x)).max()) <= 1.0 + 1e-5


def test_multi_crop_views_have_their_sizes_and_differ(tmp_path):
  data = fixtures.write_image(str(tmp_path / "x.jpg"), seed=0, size=(80, 60))
  crops = preprocess.dino_crops(48, 24, 3)
  rng = np.random.default_rng(0)
  views = preprocess.multi_crop(data, crops, rng)
  assert [v.shape for v in views] == [(48, 48, 3)] * 2 + [(24, 24, 3)] * 3
  assert not np.array_equal(views[0], views[1])
  again = preprocess.multi_crop(data, crops, np.random.default_rng(0))
  for a, b in zip(views, again):  # Deterministic given the generator.
    np.testing.assert_array_equal(a, b)


# The aligner -------------------------------------------------------------------------------


def _linear_problem(n=4000, d_in=48, d_out=12, noise=0.0, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d_in)) * rng.uniform(0.05, 20, d_in) + rng.normal(size=d_in) * 7
  weights = rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)
  bias = rng.normal(size=d_out) * 3
  y = x @ weights + bias + noise * rng.normal(size=(n, d_out))
  return x.astype(np.float32), y.astype(np.float32), weights, bias


def test_closed_form_recovers_a_known_map_with_bias():
  x, y, weights, bias = _linear_problem()
  w, b = aligner.fit_closed_form(aligner.in_batches(x, y, 512), ridge=0.0)
  np.testing.assert_allclose(w, weights, atol=1e-5)
  np.testing.assert_allclose(b, bias, atol=1e-5)


def test_bias_is_right_when_inputs_are_rescaled():
  x, y, weights, bias = _linear_problem()
  for scale in (0.01, 250.0):
    w, b = aligner.fit_closed_form(aligner.in_batches(x * scale, y, 700), ridge=0.0)
    np.testing.assert_allclose(w * scale, weights, atol=1e-5)
    np.testing.assert_allclose(b, bias, atol=1e-5)  # Not rescaled with the inputs.
  # Without standardisation the same map comes out (less well conditioned, same optimum).
  w, b = aligner.fit_closed_form(aligner.in_batches(x, y, 700), ridge=0.0, standardize=False)
  np.testing.assert_allclose(b, bias, atol=1e-4)


def test_closed_form_is_at_least_as_good_as_sgd():
  x, y, _, _ = _linear_problem(n=5000, noise=0.3)
  x, y, x_test, y_test = x[:4000], y[:4000], x[4000:], y[4000:]
  w, b = aligner.fit_closed_form(aligner.in_batches(x, y), ridge=1e-8)
  ws, bs = aligner.fit_sgd(x, y, epochs=10, batch_size=100, lr=1e-2)
  closed = aligner.evaluate(aligner.in_batches(x, y), w, b)
  sgd = aligner.evaluate(aligner.in_batches(x, y), ws, bs)
  assert closed["r2"] >= sgd["r2"] and closed["mse"] <= sgd["mse"]
  assert aligner.evaluate(aligner.in_batches(x_test, y_test), w, b)["r2"] > 0.95


def test_evaluate_matches_numpy():
  x, y, _, _ = _linear_problem(noise=1.0)
  w = np.random.default_rng(5).normal(size=(x.shape[1], y.shape[1]))
  b = np.ones(y.shape[1])
  got = aligner.evaluate(aligner.in_batches(x, y, 333), w, b)
  x, y = x.astype(np.float64), y.astype(np.float64)
  pred = x @ w + b
  mse = np.mean((pred - y) ** 2)
  r2 = 1 - np.sum((pred - y) ** 2) / np.sum((y - y.mean(0)) ** 2)
  np.testing.assert_allclose([got["mse"], got["r2"]], [mse, r2], rtol=1e-9)


# k-NN ------------------------------------------------------------------------------------------


def test_knn_votes_match_a_direct_computation():
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(50, 6))
  bank /= np.linalg.norm(bank, axis=1, keepdims=True)
  labels = rng.integers(0, 4, 50)
  queries = bank[:7] + 0.05 * rng.normal(size=(7, 6))
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  got = knn.knn_predict(bank, labels, queries, 4, k=5, temperature=0.1, chunk=3)
  for q, row in zip(queries, got):
    sims = bank @ q
    top = np.argsort(-sims)[:5]
    want = np.zeros(4)
    for i in top:
      want[labels[i]] += np.exp(sims[i] / 0.1)
    np.testing.assert_allclose(row, want, rtol=1e-6)
  assert np.all(got.argmax(1) == labels[:7])  # Near-copies of bank points find their class.


# The stages end to end through launch.py ----------------------------------------------------


def _summary(workdir):
  import json  # pylint: disable=g-import-not-at-top
  with open(f"{workdir}/summary.json") as f:
    return json.load(f)


def test_dino_and_joint_runs_end_to_end(data_dir, tmp_path):
  from conftest import launch  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from agriclip_jax import metric_writer  # pylint: disable=g-import-not-at-top
  from agriclip_jax.pytree import flatten  # pylint: disable=g-import-not-at-top
  result = launch(str(tmp_path / "dino"), "tests/tiny_config.py:kind=dino", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = _summary(tmp_path / "dino")
  assert summary["knn/bank_size"] == 720 and summary["knn/num_examples"] == 180
  state = ocp.PyTreeCheckpointer().restore(str(tmp_path / "dino/checkpoints/12/state"))
  assert float(np.abs(np.asarray(state["center"])).sum()) > 0  # The center moved...
  student, teacher = state["params"], state["teacher"]
  # The last layer is frozen for the first 50 steps: still equal to the teacher's copy...
  np.testing.assert_array_equal(student["head"]["last_layer"]["kernel"],
                                teacher["head"]["last_layer"]["kernel"])
  # ...while the backbone trained and the teacher trails it as an EMA.
  assert not np.allclose(student["img"]["embedding"]["kernel"],
                         teacher["img"]["embedding"]["kernel"])
  logged = [r for r in metric_writer.read_jsonl(str(tmp_path / "dino")) if "loss" in r][-1]
  for key in ("teacher/entropy", "teacher_momentum", "teacher_temp", "weight_decay"):
    assert key in logged
  # Unfrozen after 4 steps, the last layer trains and the teacher's trails it.
  result = launch(str(tmp_path / "dino_unfrozen"), "tests/tiny_config.py:kind=dino",
                  "--config.dino.freeze_last_layer_steps=4", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  state = ocp.PyTreeCheckpointer().restore(str(tmp_path / "dino_unfrozen/checkpoints/12/state"))
  assert not np.allclose(state["params"]["head"]["last_layer"]["kernel"],
                         state["teacher"]["head"]["last_layer"]["kernel"])

  # Joint training with the contrastive term weighted 0: the DINO term alone trains the image
  # tower, and no gradient reaches the text tower or the logit scale, so what weight decay does
  # not touch (biases, scales) stays bit-equal from checkpoint to checkpoint.
  result = launch(str(tmp_path / "joint"), "tests/tiny_config.py:kind=joint",
                  "--config.loss_weights.contrastive.start=0",
                  "--config.loss_weights.contrastive.end=0", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  first, last = (flatten(ocp.PyTreeCheckpointer().restore(
      str(tmp_path / f"joint/checkpoints/{step}/state"))["params"]) for step in (4, 12))
  undecayed = [k for k in first if not k.endswith("/kernel") and not k.endswith("embedding")]
  assert [k for k in undecayed if k.startswith("txt/")]
  for key in undecayed:
    if key.startswith("txt/") or key == "logit_scale":
      np.testing.assert_array_equal(first[key], last[key], err_msg=key)
  assert not np.array_equal(first["img/encoder/norm/bias"], last["img/encoder/norm/bias"])
  assert "heldout/top1" in _summary(tmp_path / "joint")


def test_alignment_and_evaluation_stages_end_to_end(data_dir, tmp_path):
  from conftest import launch  # pylint: disable=g-import-not-at-top
  result = launch(str(tmp_path / "align"), "tests/tiny_config.py:kind=align",
                  data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = _summary(tmp_path / "align")
  for way in ("clip", "agriclip", "mix"):
    assert summary[f"heldout/{way}/num_examples"] == 48
  assert summary["align/fit_rows"] == 720 and summary["align/heldout_rows"] == 180
  assert summary["align/fit_r2"] >= summary["align/heldout_r2"] - 1e-9
  assert (tmp_path / "align" / "aligner.npz").exists()
  assert (tmp_path / "clip" / "summary.json").exists()  # Required runs were run first.
  assert "heldout/agriclip: top-1" in result.stdout
  _check_exports(tmp_path)

  result = launch(str(tmp_path / "eval"), "tests/tiny_config.py:kind=align_eval",
                  data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  evaluated = _summary(tmp_path / "eval")
  assert "align/fit_r2" not in evaluated  # Nothing fitted: the align stage's aligner is used.
  for key in ("heldout/agriclip/top1", "heldout/mix/top1", "test/clip/top1"):
    assert evaluated[key] == summary[key], key

  # An evaluation job loads an align run as the AgriCLIP model (DINO -> aligner, CLIP text),
  # and a downloaded checkpoint (here a random Hugging Face CLIP) beside the runs.
  importer_utils.hf_clip_with_tokenizer(tmp_path / "hf")
  result = launch(str(tmp_path / "suite"), "tests/tiny_config.py:kind=eval_heldout",
                  f"--config.checkpoints={tmp_path}/align,{tmp_path}/clip,{tmp_path}/hf",
                  "--config.names=agriclip,clip,hf", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "suite" / "results.json") as f:
    results = json.load(f)
  for way in ("agriclip", "clip"):
    heldout = results[way]["heldout"]
    assert heldout["zeroshot/num_examples"] == 48
    assert heldout["zeroshot/top1"] == pytest.approx(summary[f"heldout/{way}/top1"], abs=1e-6)
    assert "taxonomy/genus/top1" in heldout
  assert results["hf"]["heldout"]["zeroshot/num_examples"] == 48

  # AgriCLIP as published aligns a pretrained DINO ResNet-50: an imported torchvision-layout
  # ResNet (18 here, for speed) stands in for the DINO run; its 512-d pooled features are fitted.
  resnet = _torchvision_resnet(tmp_path / "resnet18.pth")
  result = launch(str(tmp_path / "align_resnet"), "tests/tiny_config.py:kind=align",
                  f"--config.align.dino_workdir={resnet}", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  aligned = _summary(tmp_path / "align_resnet")
  assert aligned["align/fit_rows"] == 720 and aligned["heldout/agriclip/num_examples"] == 48
  with np.load(tmp_path / "align_resnet" / "aligner.npz") as aligner:
    assert aligner["W"].shape == (512, 32)


def _check_exports(tmp_path) -> None:
  """The align run exports its aligner as an nn.Linear's weight and bias; the demo-form CLIP
  run (average pooling, no class token) falls back to the native format in one line."""
  from agriclip_jax import export  # pylint: disable=g-import-not-at-top
  from agriclip_jax.models.importers import common  # pylint: disable=g-import-not-at-top
  assert export.main(["--workdir", str(tmp_path / "align"), "--out",
                      str(tmp_path / "aligner_out")]) == 0
  exported = common.read_safetensors(str(tmp_path / "aligner_out" / "aligner.safetensors"))
  with np.load(tmp_path / "align" / "aligner.npz") as aligner:
    np.testing.assert_array_equal(exported["weight"], aligner["W"].T)
    np.testing.assert_array_equal(exported["bias"], aligner["b"].reshape(-1))
  status = export.main(["--workdir", str(tmp_path / "clip"), "--out", str(tmp_path / "clip_out"),
                        "--format", "hf"])
  assert status == export.FALLBACK_STATUS
  assert (tmp_path / "clip_out" / "agriclip_model.json").is_file()


def _torchvision_resnet(path) -> str:
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
  return str(path)


def test_mixed_embeddings_score_the_weighted_sum_of_both_logits():
  from agriclip_jax.trainers import align  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  agri, clip_img, text = (rng.normal(size=(n, 5)) for n in (3, 3, 4))
  for w in (0.0, 0.3, 1.0):
    mixed = np.asarray(align.mix_image_embeddings(agri, clip_img, w)) @ np.asarray(
        align.mix_text_embeddings(text)).T
    np.testing.assert_allclose(mixed, (1 - w) * agri @ text.T + w * clip_img @ text.T,
                               rtol=1e-5)
