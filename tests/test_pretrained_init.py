"""config.init from pretrained checkpoints: a run starts from imported weights, or stops with one
line when they do not fit."""

import jax
import numpy as np
import pytest

from agriclip_jax import runs
from agriclip_jax import sharding
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
  assert "\n" not in message and "would stay random: img/encoder/block01/" in message

  torchvision = pytest.importorskip("torchvision")
  torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
  config["img"]["depth"] = 1
  with pytest.raises(config_lib.ConfigError) as error:
    state_lib.load_pretrained(_init(img=dict(path=str(tmp_path / "r18.pth"), format="",
                                             classifier=False)), {}, _spec_of(config), config)
  message = str(error.value)
  assert "\n" not in message and "(dino_resnet) does not fit the configured model: img/" in message
  assert "is not in this model" in message
