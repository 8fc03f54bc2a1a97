"""config.init from pretrained checkpoints: a run starts from imported weights, or stops with one
line when they do not fit."""

import re

import jax
import numpy as np
import pytest

from agriclip_jax import runs
from agriclip_jax import sharding
from agriclip_jax.pytree import flatten
from conftest import launch
import importer_utils as utils

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# tests/tiny_config.py's towers (width 32, depth 1, 2 heads, MLP 64; 32 px, patch 8;
# 16 text positions; embeddings 32) in CLIP form.
CLIP_FORM = ("--config.model.img.preset=clip", "--config.model.img.pool_type=tok",
             "--config.model.txt.preset=clip")


def test_clip_run_starts_from_imported_weights(data_dir, tmp_path):
  reference = utils.hf_clip_with_tokenizer(tmp_path / "hf")
  workdir = tmp_path / "run"
  result = launch(str(workdir), "tests/tiny_config.py:kind=clip", *CLIP_FORM,
                  f"--config.init.model.path={tmp_path / 'hf'}", "--config.optim.lr=0",
                  "--config.total_steps=2", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "config.init.model: " in result.stderr and "(hf_clip)" in result.stderr
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)], jax.local_devices()[:1])
  run = runs.load(str(workdir), mesh)
  images = utils.random_images(2, 32)
  with torch.no_grad():
    want = reference.get_image_features(pixel_values=torch.from_numpy(images))
  want = getattr(want, "pooler_output", want).numpy()
  with jax.default_matmul_precision("highest"):
    # encode_images takes uint8 pixels; feed normalised floats straight to the model instead.
    model_params = run.params
    from agriclip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
    model = two_towers.make(run.config.model, vocab_size=run.tokenizer.vocab_size)
    zimg, _, extras = model.apply({"params": model_params}, images.transpose(0, 2, 3, 1), None)
  got = np.asarray(zimg) * np.asarray(extras["img/norm"])[:, None]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flags,message", [
    (("--config.model.img.width=48",),
     "config.init.model: {hf} (hf_clip) does not fit the configured model: img/cls is "
     "(1, 1, 32) in the checkpoint vs (1, 1, 48) here"),
    # Same shapes, another function: a GELU tower configured for QuickGELU weights.
    (("--config.model.img.preset=open_clip",),
     "config.init.model: {hf} (hf_clip) has img activation='quick_gelu', the configured model "
     "activation='gelu'"),
])
def test_checkpoint_that_does_not_fit_is_one_line(data_dir, tmp_path, flags, message):
  utils.hf_clip_with_tokenizer(tmp_path / "hf")
  result = launch(str(tmp_path / "run"), "tests/tiny_config.py:kind=clip", *CLIP_FORM, *flags,
                  f"--config.init.model.path={tmp_path / 'hf'}", data_dir=data_dir)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert message.format(hf=tmp_path / "hf") in errors[0], errors[0]
  assert "Traceback" not in result.stderr


def test_parameters_the_checkpoint_lacks_must_be_allowed_to_stay_random(data_dir, tmp_path):
  utils.hf_clip_with_tokenizer(tmp_path / "hf")
  common_flags = (*CLIP_FORM, f"--config.init.model.path={tmp_path / 'hf'}",
                  "--config.init.skip=img/head/.*", "--config.total_steps=2")
  result = launch(str(tmp_path / "run"), "tests/tiny_config.py:kind=clip", *common_flags,
                  "--config.model.logit_bias_init=-10.0", data_dir=data_dir)
  assert result.returncode == 2
  assert "1 parameters of this model are not in" in result.stderr
  assert "logit_bias" in result.stderr and "config.init.allow_random" in result.stderr
  result = launch(str(tmp_path / "run"), "tests/tiny_config.py:kind=clip", *common_flags,
                  "--config.model.logit_bias_init=-10.0", "--config.init.allow_random=logit_bias",
                  data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]


def _spec_of(model_config, image_size=32, text_len=16):
  """A stand-in StateSpec (abstract params + shardings on one device) for `model_config`."""
  import types  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from agriclip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
  model = two_towers.make(ml_collections.ConfigDict(model_config))
  abstract = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, image_size,
                                                                     image_size, 3)),
                            np.zeros((1, text_len), np.int32))["params"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return types.SimpleNamespace(abstract={"params": abstract},
                               shardings={"params": jax.tree.map(lambda _: device, abstract)})


def _init(**sources):
  import ml_collections  # pylint: disable=g-import-not-at-top
  base = dict(skip="", allow_random="", model=dict(path="", format=""),
              img=dict(path="", format="", classifier=False), txt=dict(path="", format=""))
  return ml_collections.ConfigDict({**base, **sources})


def test_deeper_model_and_foreign_tower_are_refused_in_one_line(tmp_path):
  """Other depth: the blocks the checkpoint lacks are named; a ResNet file for a ViT tower:
  its first parameter is named as not in this model."""
  from agriclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  from agriclip_jax.trainers import state as state_lib  # pylint: disable=g-import-not-at-top
  reference = utils.hf_clip_with_tokenizer(tmp_path / "hf")
  vocab = reference.config.text_config.vocab_size
  tower = dict(preset="clip", width=32, mlp_dim=64, num_heads=2, head=True)
  config = dict(img=dict(tower, depth=2, patch_size=8), txt=dict(tower, depth=1, vocab_size=vocab),
                out_dim=32, logit_scale_init=10.0)
  spec = _spec_of(config)
  with pytest.raises(config_lib.ConfigError) as error:
    state_lib.load_pretrained(_init(model=dict(path=str(tmp_path / "hf"), format="")), {},
                              spec, config)
  message = str(error.value)
  assert "\n" not in message
  assert re.search(r"would stay random: img/encoder/block01/\S+ \(\d+(, \d+)*,?\)", message)

  torchvision = pytest.importorskip("torchvision")
  torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
  config["img"]["depth"] = 1
  with pytest.raises(config_lib.ConfigError) as error:
    state_lib.load_pretrained(_init(img=dict(path=str(tmp_path / "r18.pth"), format="",
                                             classifier=False)), {}, _spec_of(config), config)
  message = str(error.value)
  assert "\n" not in message and "(dino_resnet) does not fit the configured model: img/" in message
  assert "is not in this model" in message


def _single_towers(tmp_path, depth=1):
  """A random CLIP's towers saved apart, as CLIPVisionModelWithProjection and
  CLIPTextModelWithProjection directories (vocabulary 99; end-of-text 98, the largest id)."""
  torch.manual_seed(0)
  tower = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=32)
  vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      **tower, num_hidden_layers=depth, image_size=32, patch_size=8)).eval()
  text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      **tower, num_hidden_layers=1, vocab_size=99, max_position_embeddings=16, bos_token_id=97,
      eos_token_id=98, pad_token_id=0)).eval()
  for model, name in ((vision, "vision"), (text, "text")):
    with torch.no_grad():  # Non-trivial norms and biases (init sets them to 1 / 0).
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / name)
  return vision, text


def test_towers_from_two_single_tower_directories_equal_transformers(tmp_path):
  """init.img and init.txt from separate sources (CLIPVisionModelWithProjection and
  CLIPTextModelWithProjection directories) give each reference tower's embeddings."""
  from agriclip_jax.models import importers  # pylint: disable=g-import-not-at-top
  from agriclip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
  from agriclip_jax.trainers import state as state_lib  # pylint: disable=g-import-not-at-top
  vision, text = _single_towers(tmp_path)
  for kind, name in (("img", "vision"), ("txt", "text")):
    checkpoint = importers.read(str(tmp_path / name))
    assert checkpoint.format == "hf_clip" and [k for k in ("img", "txt")
                                               if k in checkpoint.model] == [kind]
  tower = dict(preset="clip", width=32, depth=1, mlp_dim=64, num_heads=2, head=True)
  config = dict(img=dict(tower, patch_size=8), txt=dict(tower, vocab_size=99),
                out_dim=32, logit_scale_init=10.0)
  spec = _spec_of(config)
  init = _init(img=dict(path=str(tmp_path / "vision"), format="", classifier=False),
               txt=dict(path=str(tmp_path / "text"), format=""))
  state = {"params": jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                  spec.abstract["params"])}
  state, loaded = state_lib.load_pretrained(init, state, spec, config)
  assert loaded == {k for k in flatten(spec.abstract["params"]) if k.startswith(("img/", "txt/"))}
  import ml_collections  # pylint: disable=g-import-not-at-top
  model = two_towers.make(ml_collections.ConfigDict(config))
  images = utils.random_images(2, 32)
  tokens = utils.random_tokens(2, 16, 99, eot=98, sot=97)
  with jax.default_matmul_precision("highest"):
    zimg, ztxt, extras = model.apply(state, images.transpose(0, 2, 3, 1),
                                     tokens.astype(np.int32))
  with torch.no_grad():
    want_img = vision(pixel_values=torch.from_numpy(images)).image_embeds.numpy()
    want_txt = text(input_ids=torch.from_numpy(tokens)).text_embeds.numpy()
  np.testing.assert_allclose(np.asarray(zimg) * np.asarray(extras["img/norm"])[:, None],
                             want_img, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(ztxt) * np.asarray(extras["txt/norm"])[:, None],
                             want_txt, atol=1e-4, rtol=1e-4)


def test_a_text_tower_for_the_image_and_a_deeper_checkpoint_are_one_line(tmp_path):
  """A text-only checkpoint named for the image tower is refused by name; a checkpoint deeper
  than the model names its extra block and that block's shapes."""
  from agriclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  from agriclip_jax.models import importers  # pylint: disable=g-import-not-at-top
  from agriclip_jax.trainers import state as state_lib  # pylint: disable=g-import-not-at-top
  _single_towers(tmp_path, depth=2)
  tower = dict(preset="clip", width=32, depth=1, mlp_dim=64, num_heads=2, head=True)
  config = dict(img=dict(tower, patch_size=8), txt=dict(tower, vocab_size=99), out_dim=32,
                logit_scale_init=10.0)
  spec = _spec_of(config)
  with pytest.raises(config_lib.ConfigError) as error:
    state_lib.load_pretrained(_init(img=dict(path=str(tmp_path / "text"), format="",
                                             classifier=False)), {}, spec, config)
  assert str(error.value) == (f"config.init.img: {tmp_path / 'text'} (hf_clip) holds no image "
                              "tower, only txt")
  with pytest.raises(config_lib.ConfigError, match="text tower only"):
    importers.build(importers.read(str(tmp_path / "text")))
  with pytest.raises(config_lib.ConfigError) as error:
    state_lib.load_pretrained(_init(img=dict(path=str(tmp_path / "vision"), format="",
                                             classifier=False)), {}, spec, config)
  message = str(error.value)
  assert "\n" not in message and "(hf_clip) does not fit the configured model" in message
  assert re.search(r": img/encoder/block01/\S+ \(\d+(, \d+)*,?\) is not in this model;", message)
