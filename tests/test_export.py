"""Export to transformers and open_clip: trained tiny CLIP- and SigLIP-form runs, loaded by the
reference libraries, give our embeddings and our token ids; import -> export round trips."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from agriclip_jax import export
from agriclip_jax import runs
from agriclip_jax import sharding
from agriclip_jax.models import importers
from agriclip_jax.models import two_towers
from agriclip_jax.models.exporters import common
from agriclip_jax.models.exporters import native
from agriclip_jax.models.importers import common as importers_common
from conftest import launch
import importer_utils as utils

TEXTS = ["a red spotted leaf", "Green plain COW", "white cow on grass, near a barn",
         "x " * 40, "élevage de vaches — prairie", ""]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """{form: workdir} of tiny CLIP- and SigLIP-form runs trained for 4 steps."""
  out = {}
  for form in ("clip", "siglip"):
    workdir = tmp_path_factory.mktemp("runs") / form
    result = launch(workdir, f"tests/tiny_config.py:kind={form}_form,steps=4", data_dir=data_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out[form] = str(workdir)
  return out


def _export(source, out, format_, capsys, expect=0):
  return _export_args(["--workdir", str(source), "--out", str(out), "--format", format_],
                      capsys, expect)


def _ours(run, images_nchw, tokens):
  """Our unnormalised image and text embeddings of float inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  model = two_towers.make(run.config.model, vocab_size=run.tokenizer.vocab_size)
  with jax.default_matmul_precision("highest"):
    zimg, ztxt, extras = model.apply({"params": jax.device_get(run.params)},
                                     images_nchw.transpose(0, 2, 3, 1), tokens)
  return (np.asarray(zimg) * np.asarray(extras["img/norm"])[:, None],
          np.asarray(ztxt) * np.asarray(extras["txt/norm"])[:, None])


def _load(workdir):
  import jax  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)], jax.local_devices())
  return runs.load(workdir, mesh)


@pytest.mark.parametrize("form", ["clip", "siglip"])
def test_hf_export_gives_our_embeddings_and_token_ids(trained, form, tmp_path, capsys):
  out = tmp_path / "hf"
  result, _ = _export(trained[form], out, "hf", capsys)
  cls = transformers.CLIPModel if form == "clip" else transformers.SiglipModel
  assert result["architecture"] == cls.__name__
  reference = cls.from_pretrained(out).eval()
  run = _load(trained[form])
  tokens = run.tokenizer.encode(TEXTS)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  ids = hf_tokenizer(TEXTS, padding="max_length", truncation=True,
                     max_length=run.tokenizer.max_len)["input_ids"]
  np.testing.assert_array_equal(np.asarray(ids), tokens)
  processor = transformers.AutoProcessor.from_pretrained(out)
  processed = processor(text=TEXTS, images=[np.zeros((40, 30, 3), np.uint8)],
                        padding="max_length", truncation=True, max_length=run.tokenizer.max_len)
  np.testing.assert_array_equal(np.asarray(processed["input_ids"]), tokens)
  assert np.asarray(processed["pixel_values"]).shape == (1, 3, run.image_size, run.image_size)
  images = utils.random_images(3, run.image_size)
  ours_img, ours_txt = _ours(run, images, tokens)
  with torch.no_grad():
    ref_img = reference.get_image_features(pixel_values=torch.tensor(images))
    inputs = hf_tokenizer(TEXTS, padding="max_length", truncation=True,
                          max_length=run.tokenizer.max_len, return_tensors="pt")
    ref_txt = reference.get_text_features(**inputs)
  ref_img = getattr(ref_img, "pooler_output", ref_img).numpy()
  ref_txt = getattr(ref_txt, "pooler_output", ref_txt).numpy()
  np.testing.assert_allclose(ref_img, ours_img, atol=utils.ATOL, rtol=1e-4)
  np.testing.assert_allclose(ref_txt, ours_txt, atol=utils.ATOL, rtol=1e-4)
  assert float(reference.logit_scale.detach().exp()) == pytest.approx(run.logit_scale, rel=1e-5)
  processor = json.loads((out / "preprocessor_config.json").read_text())
  assert processor["image_mean"] == pytest.approx(list(run.config.input.mean))
  # And back: our importer reads the export as the run's own parameters (functionally).
  imported = utils.our_embeddings(importers.read(str(out)), images, tokens)
  np.testing.assert_allclose(imported[0], ours_img, atol=utils.ATOL)
  np.testing.assert_allclose(imported[1], ours_txt, atol=utils.ATOL)


def test_open_clip_export_gives_our_embeddings_and_token_ids(trained, tmp_path, capsys):
  open_clip = pytest.importorskip("open_clip")
  out = tmp_path / "oc"
  _export(trained["clip"], out, "open_clip", capsys)
  model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
  model.eval()
  tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
  run = _load(trained["clip"])
  tokens = run.tokenizer.encode(TEXTS)
  np.testing.assert_array_equal(tokenizer(TEXTS).numpy(), tokens)
  images = utils.random_images(3, run.image_size)
  ours_img, ours_txt = _ours(run, images, tokens)
  with torch.no_grad():
    ref_img = model.encode_image(torch.tensor(images)).numpy()
    ref_txt = model.encode_text(torch.tensor(tokens.astype(np.int64))).numpy()
  np.testing.assert_allclose(ref_img, ours_img, atol=utils.ATOL, rtol=1e-4)
  np.testing.assert_allclose(ref_txt, ours_txt, atol=utils.ATOL, rtol=1e-4)


def test_a_model_open_clip_cannot_express_is_written_natively_with_one_line(
    trained, tmp_path, capsys):
  out = tmp_path / "native"
  result, err = _export(trained["siglip"], out, "open_clip", capsys,
                        expect=export.FALLBACK_STATUS)
  assert result["format"] == "native" and result["requested"] == "open_clip"
  assert len(err.strip().splitlines()) == 1 and "image pooling 'map'" in err
  description, params = native.load(str(out))
  run = _load(trained["siglip"])
  ours = common.flatten(run.params)
  assert set(params) == set(ours)
  for key, value in ours.items():
    np.testing.assert_array_equal(params[key], value)
  assert description["towers"]["img"]["pool_type"] == "map"


def test_hf_clip_import_export_round_trip_keeps_every_weight(tmp_path, capsys):
  utils.hf_clip_with_tokenizer(tmp_path / "hf")
  _export(tmp_path / "hf", tmp_path / "out", "hf", capsys)
  before = importers_common.read_safetensors(str(tmp_path / "hf" / "model.safetensors"))
  after = importers_common.read_safetensors(str(tmp_path / "out" / "model.safetensors"))
  assert set(before) - {"text_model.embeddings.position_ids",
                        "vision_model.embeddings.position_ids"} == set(after)
  pos, cls = ("vision_model.embeddings." + n for n in ("position_embedding.weight",
                                                        "class_embedding"))
  for key in set(after) - {pos, cls}:
    assert after[key].shape == before[key].shape, key
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  # The class token's position is folded into the class token on import (our class token has
  # no position): the export's class token is their sum, its position zero.
  np.testing.assert_array_equal(after[pos][1:], before[pos][1:])
  np.testing.assert_array_equal(after[pos][0], 0)
  np.testing.assert_allclose(after[cls], before[cls] + before[pos][0], rtol=0, atol=0)
  for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
    assert (tmp_path / "out" / name).is_file()


def test_aligner_exports_as_a_pytorch_linear(tmp_path):
  rng = np.random.default_rng(0)
  weights, bias = rng.normal(size=(6, 4)), rng.normal(size=(4,))
  native.export_aligner(weights, bias, str(tmp_path), "run")
  layer = torch.nn.Linear(6, 4)
  state = importers_common.read_safetensors(str(tmp_path / native.ALIGNER))
  layer.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
  x = rng.normal(size=(5, 6)).astype(np.float32)
  with torch.no_grad():
    np.testing.assert_allclose(layer(torch.tensor(x)).numpy(), x @ weights + bias, atol=1e-5)


def test_export_refuses_a_non_empty_output_and_a_missing_run_in_one_line(tmp_path, capsys):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "x").write_text("")
  assert export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
  assert "not empty" in capsys.readouterr().err
  assert export.main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_inverted_tables_refuse_parameters_without_a_place():
  with pytest.raises(common.ExportError, match="img/extra"):
    common.invert({"img/extra/kernel": np.zeros((2, 2))}, [], "x")


def test_export_of_a_chosen_step_and_of_a_step_the_run_does_not_keep(trained, tmp_path, capsys):
  result, _ = _export_args(["--workdir", trained["clip"], "--out", str(tmp_path / "s4"),
                            "--format", "native", "--step", "4"], capsys)
  assert result["step"] == 4
  code = export.main(["--workdir", trained["clip"], "--out", str(tmp_path / "s3"),
                      "--step", "3"])
  err = capsys.readouterr().err
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert "has no checkpoint at step 3 (it keeps [4])" in err


def _export_args(argv, capsys, expect=0):
  code = export.main(argv)
  captured = capsys.readouterr()
  assert code == expect, captured.err
  return json.loads(captured.out), captured.err


def test_a_run_without_a_model_is_named_before_its_checkpoints_are_sought(tmp_path):
  """An evaluation job's workdir has a config.json (it is a run) but no model and no
  checkpoints: loading it says so, instead of "has no checkpoint"."""
  from agriclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  (tmp_path / "config.json").write_text(json.dumps({"trainer": "eval"}))
  with pytest.raises(config_lib.ConfigError, match="a 'eval' run has no model to evaluate"):
    runs.load(str(tmp_path), sharding.make_mesh([("data", -1)]))
