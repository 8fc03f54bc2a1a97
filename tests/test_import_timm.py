"""timm ViT, AugReg / big_vision .npz and DINO imports: pooled features and logits equal timm's
own forward of the same (random) weights."""

import argparse
import json
import os

import numpy as np
import pytest

from agriclip_jax.models import importers
from agriclip_jax.models import two_towers
from agriclip_jax.models import vit
from agriclip_jax.models.importers import common
from agriclip_jax.models.importers import dino
from agriclip_jax.models.importers import resample
import importer_utils as utils

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")
timm_vit = pytest.importorskip("timm.models.vision_transformer")


def _timm_model(seed=0, img_size=32, embed_dim=48, num_heads=4, **kwargs):
  """A small timm ViT whose every parameter is perturbed (norms, biases, LayerScale non-trivial)."""
  torch.manual_seed(seed)
  kwargs = dict(dict(patch_size=8, depth=2, num_classes=10), **kwargs)
  model = timm_vit.VisionTransformer(img_size=img_size, embed_dim=embed_dim, num_heads=num_heads,
                                     **kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _state(model) -> dict:
  return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _timm_features(model, images, pre_logits=True) -> np.ndarray:
  with torch.no_grad():
    x = model.forward_features(torch.from_numpy(images))
    return model.forward_head(x, pre_logits=pre_logits).numpy()


def _timm_dir(path, model, architecture="vit_test_patch8_32", **config):
  os.makedirs(path, exist_ok=True)
  safetensors_torch.save_file(_state(model), os.path.join(path, "model.safetensors"))
  config = dict(dict(architecture=architecture, num_classes=10, global_pool="token",
                     pretrained_cfg=dict(input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3,
                                         num_classes=10, classifier="head")), **config)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return str(path)


def _ours(checkpoint, images) -> tuple[np.ndarray, np.ndarray | None]:
  """(pooled features, logits) of our model of `checkpoint` (one jitted apply, HIGHEST
  precision); logits with the optional classifier head loaded (fit(..., optional=True)) where
  the file has one, else None."""
  import jax  # pylint: disable=g-import-not-at-top
  from agriclip_jax.pytree import flatten, unflatten  # pylint: disable=g-import-not-at-top
  head = "img/head/bias" in checkpoint.optional
  num_classes = checkpoint.optional["img/head/bias"].shape[0] if head else None
  model = vit.Model(**two_towers.tower_kwargs(dict(checkpoint.model["img"], head=head), "img",
                                              num_classes, "float32"))
  x = images.transpose(0, 2, 3, 1)
  shapes = {"img": jax.eval_shape(model.init, jax.random.key(0), x)["params"]}
  params = common.fit(checkpoint, flatten(shapes), lambda k: k.startswith("img/"), "test",
                      optional=head)
  with jax.default_matmul_precision("highest"):
    logits, out = jax.jit(model.apply)({"params": unflatten(params)["img"]}, x)
  return np.asarray(out["pre_logits"]), np.asarray(logits) if head else None


def _assert_equal_timm(checkpoint, model, images):
  """Our pooled features and (if the file has a head) logits equal timm's."""
  features, logits = _ours(checkpoint, images)
  _assert_close(features, _timm_features(model, images))
  if logits is not None:
    _assert_close(logits, _timm_features(model, images, pre_logits=False))


def _assert_close(got, want):
  np.testing.assert_allclose(got, want, atol=utils.ATOL, rtol=1e-4)


# ------------------------------------------------------------------------------------ timm

def test_timm_directory_token_pooling_and_head_equal_timm(tmp_path):
  """The LiT tower's form (vit_large_patch16_384.augreg_in21k_ft_in1k): class token after the
  final norm; the classifier head only when asked for, then timm's logits."""
  model = _timm_model()
  path = _timm_dir(tmp_path / "vit", model, model_args=dict(num_heads=4))
  assert importers.detect(path) == "timm"
  checkpoint = importers.read(path)
  assert checkpoint.model["img"]["num_heads"] == 4
  assert checkpoint.model["img"]["pool_type"] == "tok"
  assert (checkpoint.image_size, checkpoint.mean) == (32, (0.5, 0.5, 0.5))
  assert not any(k.startswith("img/head") for k in checkpoint.params)
  images = utils.random_images(3, 32)
  import jax  # pylint: disable=g-import-not-at-top
  tower, params = importers.build(checkpoint)  # No head by default.
  assert "head" not in params
  with jax.default_matmul_precision("highest"):
    got, _ = jax.jit(tower.apply)({"params": params}, images.transpose(0, 2, 3, 1))
  _assert_close(np.asarray(got), _timm_features(model, images))
  _assert_equal_timm(checkpoint, model, images)


@pytest.mark.parametrize("kind", ["registers_layer_scale_pre_norm", "gap_no_fc_norm", "map"])
def test_timm_variants_equal_timm(tmp_path, kind):
  """Files without num_heads (width // 64 assumed): registers with positions, LayerScale,
  CLIP-style pre-norm without patch or qkv bias; average pooling with the final norm and no
  class-token positions; MAP pooling (SigLIP's form)."""
  options = {
      "registers_layer_scale_pre_norm": dict(reg_tokens=2, init_values=1e-5, pre_norm=True,
                                             qkv_bias=False),
      "gap_no_fc_norm": dict(global_pool="avg", fc_norm=False, reg_tokens=1, no_embed_class=True),
      "map": dict(global_pool="map", class_token=False),
  }[kind]
  model = _timm_model(embed_dim=128, num_heads=2, **options)
  if kind == "map":  # A timm training checkpoint's form.
    path = str(tmp_path / "vit.pth")
    torch.save({"state_dict": _state(model), "args": argparse.Namespace(model="vit")}, path)
  elif kind == "gap_no_fc_norm":  # With a class token, only config.json tells "avg" from "token".
    path = _timm_dir(tmp_path / "vit", model, global_pool="avg")
  else:
    path = str(tmp_path / "vit.safetensors")
    safetensors_torch.save_file(_state(model), path)
  assert importers.detect(path) == "timm"
  checkpoint = importers.read(path)
  assert checkpoint.model["img"]["num_heads"] == 2
  _assert_equal_timm(checkpoint, model, utils.random_images(2, 32))


def test_timm_fc_norm_is_refused_in_one_line(tmp_path):
  model = _timm_model(global_pool="avg", class_token=False)  # fc_norm by default with "avg".
  path = str(tmp_path / "gap.safetensors")
  safetensors_torch.save_file(_state(model), path)
  with pytest.raises(common.CheckpointImportError) as error:
    importers.read(path)
  assert "fc_norm" in str(error.value) and "\n" not in str(error.value)


def test_timm_resampled_resolution_equals_timms_own_resampling(tmp_path):
  """32 -> 48 px (4x4 -> 6x6 patches): timm loads the state dict into a 48 px model through
  `checkpoint_filter_fn`, which resizes with bicubic antialias=True (PIL's cubic, also when
  enlarging); our import resizes the same way. PyTorch's plain bicubic would differ."""
  model = _timm_model(reg_tokens=1)
  path = _timm_dir(tmp_path / "vit", model, model_args=dict(num_heads=4))
  checkpoint = importers.read(path)
  bigger = timm_vit.VisionTransformer(img_size=48, patch_size=8, embed_dim=48, depth=2,
                                      num_heads=4, num_classes=10, reg_tokens=1).eval()
  bigger.load_state_dict(timm_vit.checkpoint_filter_fn(_state(model), bigger))
  _assert_equal_timm(checkpoint, bigger, utils.random_images(2, 48))
  assert checkpoint.params["img/pos_embedding"].shape == (1, 4, 4, 48)
  plain = resample.resample_grid(checkpoint.params["img/pos_embedding"], 6, 6)
  ours = checkpoint.resample(checkpoint.params["img/pos_embedding"], 6, 6)
  assert np.abs(plain - ours).max() > 1e-2


# ------------------------------------------------------------------------------------ DINO

def _dino_head(seed, in_dim=48, hidden=32, bottleneck=16, out_dim=20, prefix="head."):
  rng = np.random.default_rng(seed)
  out = {}
  for index, (a, b) in zip((0, 2, 4), ((in_dim, hidden), (hidden, hidden), (hidden, bottleneck))):
    out[f"{prefix}mlp.{index}.weight"] = torch.tensor(rng.normal(size=(b, a)) * 0.2).float()
    out[f"{prefix}mlp.{index}.bias"] = torch.tensor(rng.normal(size=(b,)) * 0.1).float()
  out[prefix + "last_layer.weight_g"] = torch.ones(out_dim, 1)
  out[prefix + "last_layer.weight_v"] = torch.tensor(rng.normal(size=(out_dim, bottleneck))).float()
  return out


def _dino_head_reference(head, x):
  """DINOHead's forward (nlayers=3, GELU, L2 norm, weight-normalised last layer) in torch."""
  gelu = torch.nn.functional.gelu
  lin = lambda i, y: y @ head[f"head.mlp.{i}.weight"].T + head[f"head.mlp.{i}.bias"]
  y = lin(4, gelu(lin(2, gelu(lin(0, torch.from_numpy(x))))))
  y = torch.nn.functional.normalize(y, dim=-1)
  v = head["head.last_layer.weight_v"]
  return (y @ (head["head.last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)).T).numpy()


def test_dino_training_checkpoint_reads_the_teacher(tmp_path):
  """A DINO checkpoint.pth: teacher (`backbone.`, `head.`) and student (`module.backbone.`),
  `args` as an argparse.Namespace. The teacher is read; its head is optional, in
  `models/dino.Head`'s layout, and gives DINOHead's output."""
  # DINO's ViTs (tiny / small / base) all have 64-wide heads: width // 64 heads is exact.
  teacher = _timm_model(seed=1, num_classes=0, embed_dim=128, num_heads=2)
  student = _timm_model(seed=2, num_classes=0, embed_dim=128, num_heads=2)
  head = _dino_head(3, in_dim=128)
  path = str(tmp_path / "checkpoint.pth")
  torch.save({
      "teacher": {**{"backbone." + k: v for k, v in _state(teacher).items()}, **head},
      "student": {**{"module.backbone." + k: v for k, v in _state(student).items()},
                  **{"module." + k: v for k, v in _dino_head(4, in_dim=128).items()}},
      "args": argparse.Namespace(arch="vit_small", patch_size=8, out_dim=20), "epoch": 3,
  }, path)
  assert importers.detect(path) == "dino"
  checkpoint = importers.read(path)
  assert checkpoint.model["img"]["preset"] == "dino"
  _assert_equal_timm(checkpoint, teacher, utils.random_images(2, 32))

  import jax  # pylint: disable=g-import-not-at-top
  from agriclip_jax.models import dino as dino_model  # pylint: disable=g-import-not-at-top
  from agriclip_jax.pytree import unflatten  # pylint: disable=g-import-not-at-top
  head_params = unflatten({k: v for k, v in checkpoint.optional.items()
                           if k.startswith("head/")})["head"]
  assert "scale" not in head_params["last_layer"]  # weight_g == 1: norm_last_layer.
  x = np.random.default_rng(0).normal(size=(3, 128)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    ours = jax.jit(dino_model.Head(out_dim=20, hidden_dim=32, bottleneck_dim=16).apply)(
        {"params": head_params}, x)
  _assert_close(np.asarray(ours), _dino_head_reference(head, x))


def test_dino_at_another_resolution_resamples_its_grid_bicubically(tmp_path):
  """DINO resizes its grid at run time with PyTorch's bicubic (by a scale factor with a +0.1
  offset, no library to compare with): at 48 px our grid is PyTorch's bicubic resize to 6x6,
  the forward equals timm's with that grid, and the checkpoint's own 4x4 grid is untouched."""
  teacher = _timm_model(seed=1, num_classes=0, embed_dim=128, num_heads=2)
  path = str(tmp_path / "checkpoint.pth")
  torch.save({"teacher": {"backbone." + k: v for k, v in _state(teacher).items()}}, path)
  checkpoint = importers.read(path, "dino")
  original = checkpoint.params["img/pos_embedding"].copy()
  assert original.shape == (1, 4, 4, 128)
  grid = teacher.pos_embed.detach()[:, 1:].reshape(1, 4, 4, 128).permute(0, 3, 1, 2)
  resized = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic",
                                            align_corners=False)
  bigger = _timm_model(seed=1, num_classes=0, embed_dim=128, num_heads=2, img_size=48)
  state = _state(teacher)
  state["pos_embed"] = torch.cat([state["pos_embed"][:, :1],
                                  resized.permute(0, 2, 3, 1).reshape(1, 36, 128)], dim=1)
  bigger.load_state_dict(state)
  _assert_equal_timm(checkpoint, bigger, utils.random_images(2, 48, seed=2))
  np.testing.assert_array_equal(checkpoint.params["img/pos_embedding"], original)


def test_dino_backbone_file_is_timm_and_resnets_are_not_dino(tmp_path):
  """A released backbone (`dino_vits16_pretrain.pth`) is a bare timm state dict: "timm" by
  detection, and format="dino" reads it too. ResNet DINO files are not "dino"."""
  model = _timm_model(num_classes=0, embed_dim=128, num_heads=2)
  path = str(tmp_path / "dino_vit_pretrain.pth")
  torch.save(_state(model), path)
  assert importers.detect(path) == "timm"
  assert dino.detect(path) is False
  as_timm, as_dino = importers.read(path), importers.read(path, "dino")
  assert as_dino.format == "dino" and as_timm.params.keys() == as_dino.params.keys()
  for key, value in as_timm.params.items():
    np.testing.assert_array_equal(value, as_dino.params[key])
  _assert_equal_timm(as_dino, model, utils.random_images(2, 32))
  resnet_state = {"conv1.weight": torch.zeros(4, 3, 7, 7), "bn1.weight": torch.ones(4),
                  "layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1)}
  for i, state in enumerate([resnet_state,
                             {"teacher": {"backbone." + k: v for k, v in resnet_state.items()},
                              "student": {"module.backbone." + k: v
                                          for k, v in resnet_state.items()}}]):
    torch.save(state, tmp_path / f"resnet{i}.pth")
    assert dino.detect(str(tmp_path / f"resnet{i}.pth")) is False


def test_dino_refuses_a_pickle_that_runs_code(tmp_path):
  marker = tmp_path / "ran"

  class Exploit:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  path = str(tmp_path / "evil.pth")
  torch.save({"teacher": {"backbone.cls_token": torch.zeros(1)}, "args": Exploit()}, path)
  with pytest.raises(common.CheckpointImportError):
    importers.read(path, "dino")
  assert not marker.exists()


# ------------------------------------------------------------------------------ big_vision

def _npz_from_timm(path, model, layout, prefix="", scanned=False, extra=None):
  """Writes `model` as the AugReg / vit_jax ("augreg") or big_vision ("big_vision") .npz: the
  inverse of the importer's table, written here independently."""
  state = {k: v.numpy().astype(np.float32) for k, v in _state(model).items()}
  width = model.embed_dim
  heads = model.blocks[0].attn.num_heads
  split = lambda w: [part.T.reshape(width, heads, width // heads) for part in np.split(w, 3)]
  mha, ln2, mlp = (("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
                   if layout == "augreg" else
                   ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))
  out = {"embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": state["patch_embed.proj.bias"],
         "Transformer/encoder_norm/scale": state["norm.weight"],
         "Transformer/encoder_norm/bias": state["norm.bias"],
         "head/kernel": state["head.weight"].T, "head/bias": state["head.bias"]}
  out["Transformer/posembed_input/pos_embedding" if layout == "augreg" else "pos_embedding"] = (
      state["pos_embed"])
  if "cls_token" in state:
    out["cls"] = state["cls_token"]
  blocks = []
  for i in range(len(model.blocks)):
    t = f"blocks.{i}."
    block = {"LayerNorm_0/scale": state[t + "norm1.weight"],
             "LayerNorm_0/bias": state[t + "norm1.bias"],
             f"{ln2}/scale": state[t + "norm2.weight"], f"{ln2}/bias": state[t + "norm2.bias"],
             f"{mha}/out/kernel": state[t + "attn.proj.weight"].T.reshape(heads, -1, width),
             f"{mha}/out/bias": state[t + "attn.proj.bias"]}
    for name, kernel, bias in zip(("query", "key", "value"), split(state[t + "attn.qkv.weight"]),
                                  np.split(state[t + "attn.qkv.bias"], 3)):
      block[f"{mha}/{name}/kernel"] = kernel
      block[f"{mha}/{name}/bias"] = bias.reshape(heads, -1)
    for j in (0, 1):
      block[f"{mlp}/Dense_{j}/kernel"] = state[t + f"mlp.fc{j + 1}.weight"].T
      block[f"{mlp}/Dense_{j}/bias"] = state[t + f"mlp.fc{j + 1}.bias"]
    blocks.append(block)
  if scanned:
    out.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks])
                for k in blocks[0]})
  else:
    out.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks)
                for k, v in b.items()})
  if "attn_pool.latent" in state:
    p, m = "MAPHead_0/", "MAPHead_0/MultiHeadDotProductAttention_0/"
    out[p + "probe"] = state["attn_pool.latent"]
    out[m + "query/kernel"] = state["attn_pool.q.weight"].T.reshape(width, heads, -1)
    out[m + "query/bias"] = state["attn_pool.q.bias"].reshape(heads, -1)
    for name, w, b in zip(("key", "value"), np.split(state["attn_pool.kv.weight"], 2),
                          np.split(state["attn_pool.kv.bias"], 2)):
      out[m + f"{name}/kernel"] = w.T.reshape(width, heads, -1)
      out[m + f"{name}/bias"] = b.reshape(heads, -1)
    out[m + "out/kernel"] = state["attn_pool.proj.weight"].T.reshape(heads, -1, width)
    out[m + "out/bias"] = state["attn_pool.proj.bias"]
    out[p + "LayerNorm_0/scale"] = state["attn_pool.norm.weight"]
    out[p + "LayerNorm_0/bias"] = state["attn_pool.norm.bias"]
    for j in (0, 1):
      out[p + f"MlpBlock_0/Dense_{j}/kernel"] = state[f"attn_pool.mlp.fc{j + 1}.weight"].T
      out[p + f"MlpBlock_0/Dense_{j}/bias"] = state[f"attn_pool.mlp.fc{j + 1}.bias"]
  np.savez(path, **{prefix + k: v for k, v in out.items()}, **(extra or {}))
  return str(path)


@pytest.mark.parametrize("layout", ["augreg", "big_vision_map_scanned"])
def test_big_vision_npz_equals_timm_and_timm_loads_it(tmp_path, layout):
  """Our import of the .npz equals timm's forward (built with Flax's tanh GELU, as the
  original models run); timm's own `_load_weights` reading the same file reproduces the
  model it was written from, so the file is the real layout, not a self-consistent one."""
  if layout == "augreg":
    options, prefix, scanned, extra = dict(), "", False, None
  else:  # A big_vision LiT-style file: image tower under params/img/, text tower beside it.
    options = dict(global_pool="map", class_token=False, no_embed_class=True)
    prefix, scanned = "params/img/", True
    extra = {"params/txt/Encoder_0/encoder_norm/scale": np.ones(4, np.float32),
             "params/t": np.ones((1,), np.float32)}
  model = _timm_model(act_layer="gelu_tanh", **options)
  path = _npz_from_timm(tmp_path / "vit.npz", model, layout.split("_map")[0], prefix, scanned,
                        extra)
  assert importers.detect(path) == "big_vision"
  checkpoint = importers.read(path)
  assert checkpoint.model["img"]["pool_type"] == ("tok" if layout == "augreg" else "map")
  images = utils.random_images(2, 32)
  _assert_equal_timm(checkpoint, model, images)

  reloaded = _timm_model(seed=5, act_layer="gelu_tanh", **options)
  with torch.no_grad():
    timm_vit._load_weights(reloaded, path)  # pylint: disable=protected-access
  _assert_close(_timm_features(reloaded, images), _timm_features(model, images))
  _assert_close(_timm_features(reloaded, images, pre_logits=False),
                _timm_features(model, images, pre_logits=False))

  # At 48 px (4x4 -> 6x6 patches): timm's loader resizes the grid bilinearly; so does ours.
  bigger = _timm_model(seed=5, img_size=48, act_layer="gelu_tanh", **options)
  with torch.no_grad():
    timm_vit._load_weights(bigger, path)  # pylint: disable=protected-access
  original = checkpoint.params["img/pos_embedding"].copy()
  _assert_equal_timm(checkpoint, bigger, utils.random_images(2, 48, seed=1))
  np.testing.assert_array_equal(checkpoint.params["img/pos_embedding"], original)


def test_big_vision_pre_logits_is_refused(tmp_path):
  model = _timm_model(act_layer="gelu_tanh")
  path = _npz_from_timm(tmp_path / "vit.npz", model, "augreg",
                        extra={"pre_logits/kernel": np.zeros((48, 48), np.float32),
                               "pre_logits/bias": np.zeros((48,), np.float32)})
  with pytest.raises(common.CheckpointImportError, match="pre_logits"):
    importers.read(path)


def test_a_pytorch_pickle_without_torch_installed_is_one_line(tmp_path):
  """Where torch is not installed, a .pth names what it needs in one line (the inspect command,
  in a process whose `import torch` fails as it does without the package)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "dino_vits16_pretrain.pth")
  torch.save(_state(_timm_model(num_classes=0)), path)
  shim = tmp_path / "no_torch" / "torch"
  shim.mkdir(parents=True)
  (shim / "__init__.py").write_text("raise ImportError('No module named torch')\n")
  env = dict(os.environ, PYTHONPATH=str(shim.parent))
  result = subprocess.run([sys.executable, "-m", "agriclip_jax.models.inspect", path], env=env,
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      f"error: {path}: reading PyTorch pickles needs torch (pip install torch), or convert the "
      "file to safetensors"], result.stderr[-2000:]
