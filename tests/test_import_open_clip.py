"""open_clip import: embeddings equal open_clip's own (random weights), tokenizer ids equal
open_clip's, and unsafe or inexpressible checkpoints refused in one line."""

import json

import numpy as np
import pytest

from agriclip_jax.input import clip_bpe
from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.models import importers
from agriclip_jax.models.importers import common
from agriclip_jax.models.importers import open_clip as open_clip_importer
import importer_utils as utils

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
safetensors_torch = pytest.importorskip("safetensors.torch")

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
VOCAB, EOT, SOT = 99, 98, 97
# One tower size and batch for every test, so JAX compiles each operation once (64-wide heads,
# as an OpenAI state dict implies).
VISION = dict(image_size=32, patch_size=8, width=128, layers=2, mlp_ratio=2.0)
TEXT = dict(context_length=16, vocab_size=VOCAB, width=128, heads=2, layers=2, mlp_ratio=2.0)
# BioCLIP's shape in miniature: the CLIP vocabulary, GELU, class-token pooling.
DIR_CFG = dict(embed_dim=24, vision_cfg=VISION, text_cfg=dict(TEXT, vocab_size=49408))
CAPTIONS = ["a photo of a Holstein cow", "wheat leaf rust (Puccinia triticina)", "",
            "Danaus plexippus, the monarch butterfly 🦋, feeding on milkweed", "x " * 40]


def _perturbed(model):
  """Random weights with non-trivial norms, biases and scales (init sets some to 1 / 0)."""
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def _save_dir(path, model, model_cfg):
  """A directory as open_clip's save_for_hf writes one: config, .safetensors and .bin."""
  path.mkdir(parents=True, exist_ok=True)
  config = dict(model_cfg=model_cfg, preprocess_cfg=dict(mean=MEAN, std=STD))
  (path / "open_clip_config.json").write_text(json.dumps(config))
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  safetensors_torch.save_file(state, str(path / "open_clip_model.safetensors"))
  torch.save(state, path / "open_clip_pytorch_model.bin")
  return path


def _openai_model(image_size=32):
  torch.manual_seed(0)
  return open_clip.model.CLIP(24, dict(VISION, image_size=image_size), TEXT, quick_gelu=True)


def _reference_embeddings(model, images, tokens):
  with torch.no_grad():
    return (model.encode_image(torch.from_numpy(images)).numpy(),
            model.encode_text(torch.from_numpy(tokens)).numpy())


def _assert_close(got, want):
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=utils.ATOL, rtol=1e-4)


def test_open_clip_directory_equals_open_clip(tmp_path):
  """BioCLIP's layout: what open_clip itself loads from the directory ('local-dir:') embeds
  images and tokenized captions exactly as our import; .safetensors and .bin agree."""
  torch.manual_seed(0)
  _save_dir(tmp_path, _perturbed(open_clip.model.CLIP(**DIR_CFG)), DIR_CFG)
  reference = open_clip.create_model(f"local-dir:{tmp_path}").eval()
  reference_tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
  assert importers.detect(str(tmp_path)) == "open_clip"
  checkpoint = importers.read(str(tmp_path))
  from_bin = importers.read(str(tmp_path / "open_clip_pytorch_model.bin"))  # Config beside it.
  assert from_bin.model == checkpoint.model and from_bin.params.keys() == checkpoint.params.keys()
  for key, value in checkpoint.params.items():
    np.testing.assert_array_equal(from_bin.params[key], value, err_msg=key)
  assert (checkpoint.image_size, checkpoint.mean, checkpoint.std) == (32, MEAN, STD)
  assert checkpoint.model["img"]["activation"] == "gelu"
  tokens = checkpoint.tokenizer(checkpoint.context_length).encode(CAPTIONS)
  np.testing.assert_array_equal(tokens, reference_tokenizer(CAPTIONS).numpy())
  images = utils.random_images(2, 32)
  want = _reference_embeddings(reference, images, tokens.astype(np.int64))
  _assert_close(utils.our_embeddings(checkpoint, images, tokens), want)
  np.testing.assert_allclose(checkpoint.model["logit_scale_init"],
                             float(reference.logit_scale.detach().exp()), rtol=1e-6)


def test_bare_openai_state_dict_equals_open_clip(tmp_path):
  """An OpenAI-style state dict alone: sizes inferred from shapes, QuickGELU assumed; a
  training checkpoint ({"state_dict": {"module.…"}}) reads the same."""
  reference = _perturbed(_openai_model())
  torch.save(reference.state_dict(), tmp_path / "ViT-tiny.pt")
  wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in
                                         reference.state_dict().items()}}
  torch.save(wrapped, tmp_path / "epoch_3.pt")
  assert importers.detect(str(tmp_path / "ViT-tiny.pt")) == "open_clip"
  checkpoint = importers.read(str(tmp_path / "ViT-tiny.pt"))
  img, txt = checkpoint.model["img"], checkpoint.model["txt"]
  assert (img["width"], img["depth"], img["num_heads"], img["patch_size"]) == (128, 2, 2, 8)
  assert (txt["width"], txt["num_heads"], txt["vocab_size"], checkpoint.context_length) == (
      128, 2, VOCAB, 16)
  assert img["activation"] == txt["activation"] == "quick_gelu"
  assert checkpoint.tokenizer is None  # Not the CLIP vocabulary: the config must name one.
  assert open_clip_importer.read(str(tmp_path / "ViT-tiny.pt"),
                                 activation="gelu").model["img"]["activation"] == "gelu"
  training = importers.read(str(tmp_path / "epoch_3.pt"))
  for key, value in checkpoint.params.items():
    np.testing.assert_array_equal(training.params[key], value, err_msg=key)
  images = utils.random_images(2, 32)
  tokens = utils.random_tokens(len(CAPTIONS), 16, VOCAB, EOT, sot=SOT)
  _assert_close(utils.our_embeddings(checkpoint, images, tokens),
                _reference_embeddings(reference, images, tokens))


def test_gap_pooled_and_other_open_clip_options_equal_open_clip(tmp_path):
  """Average pooling, LayerScale, no ln_pre; a custom-text (`text.*`) bidirectional tower
  pooled at the last token with a biased projection; SigLIP-style logit bias, [1] scale."""
  model_cfg = dict(
      embed_dim=24, custom_text=True, init_logit_bias=-4.0, nonscalar_logit_scale=True,
      vision_cfg=dict(VISION, head_width=32, pool_type="avg", ls_init_value=0.5, no_ln_pre=True),
      text_cfg=dict(TEXT, heads=4, no_causal_mask=True, pool_type="last", proj_bias=True))
  torch.manual_seed(0)
  reference = _perturbed(open_clip.model.CustomTextCLIP(
      24, model_cfg["vision_cfg"], model_cfg["text_cfg"], init_logit_bias=-4.0,
      nonscalar_logit_scale=True))
  _save_dir(tmp_path, reference, model_cfg)
  checkpoint = importers.read(str(tmp_path))
  img, txt = checkpoint.model["img"], checkpoint.model["txt"]
  assert (img["pool_type"], img["pre_norm"], img["layer_scale"] is not None) == ("gap", False,
                                                                                True)
  assert (txt["pool_type"], txt["causal"], txt["head_bias"]) == ("last", False, True)
  assert img["num_heads"] == txt["num_heads"] == 4  # From the config, not 64-wide heads.
  np.testing.assert_allclose(checkpoint.model["logit_bias_init"],
                             float(reference.logit_bias.detach()[0]), rtol=1e-6)
  images = utils.random_images(2, 32)
  tokens = utils.random_tokens(len(CAPTIONS), 16, VOCAB, EOT, sot=SOT)
  _assert_close(utils.our_embeddings(checkpoint, images, tokens),
                _reference_embeddings(reference, images, tokens))


def test_resampled_resolution_equals_open_clip_resize(tmp_path):
  """32 -> 48 px (4x4 -> 6x6 patches): equal to open_clip loading the same state dict into
  a 48 px model through its own `resize_pos_embed` (antialiased bicubic, as we resample
  open_clip checkpoints)."""
  small = _perturbed(_openai_model())
  torch.save(small.state_dict(), tmp_path / "small.pt")
  big = _openai_model(image_size=48).eval()
  state = dict(small.state_dict())
  open_clip.model.resize_pos_embed(state, big)
  big.load_state_dict(state)
  checkpoint = importers.read(str(tmp_path / "small.pt"))
  _, params = importers.build(checkpoint, image_size=48)
  assert params["img"]["pos_embedding"].shape == (1, 6, 6, 128)
  assert checkpoint.params["img/pos_embedding"].shape == (1, 4, 4, 128)  # Untouched.
  images = utils.random_images(2, 48)
  got, _ = utils.our_embeddings(checkpoint, images)
  want, _ = _reference_embeddings(big, images, np.zeros((1, 16), np.int64))
  np.testing.assert_allclose(got, want, atol=utils.ATOL, rtol=1e-4)


def test_code_running_pickle_is_refused_and_never_run(tmp_path):
  """A downloaded look-alike whose .bin runs code when unpickled: refused with one line, the
  code never runs (its marker file is absent) — though a plain torch.load would run it."""
  marker = tmp_path / "pwned"

  class RunsCode:
    def __reduce__(self):
      return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

  bundle = tmp_path / "bundle"
  bundle.mkdir()
  (bundle / "open_clip_config.json").write_text(json.dumps(dict(model_cfg=DIR_CFG)))
  payload = {"visual.conv1.weight": torch.zeros(2), "logit_scale": RunsCode()}
  torch.save(payload, bundle / "open_clip_pytorch_model.bin")
  torch.save(payload, tmp_path / "bare.bin")
  with pytest.raises(common.CheckpointImportError) as error:
    importers.read(str(bundle))
  assert "\n" not in str(error.value) and "refused" in str(error.value)
  with pytest.raises(common.CheckpointImportError):
    importers.read(str(tmp_path / "bare.bin"), format="open_clip")
  assert not open_clip_importer.detect(str(tmp_path / "bare.bin"))
  assert not marker.exists()
  torch.load(tmp_path / "bare.bin", weights_only=False)  # The payload is real.
  assert marker.read_text() == "ran"


def _unsupported_models():
  vision, text = dict(VISION, width=32, head_width=16), dict(TEXT, width=32)
  return {
      "ModifiedResNet": dict(embed_dim=24, vision_cfg=dict(layers=[1, 1, 1, 1], width=8,
                                                           image_size=32), text_cfg=text),
      "attentional pooler": dict(embed_dim=24, text_cfg=text, vision_cfg=dict(
          vision, attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)),
      "custom attention blocks": dict(embed_dim=24, vision_cfg=dict(vision, qk_norm=True),
                                      text_cfg=text),
      "LayerScale in the text tower": dict(embed_dim=24, vision_cfg=vision,
                                           text_cfg=dict(text, ls_init_value=0.1)),
      "average pooling before the final LayerNorm": dict(
          embed_dim=24, text_cfg=text,
          vision_cfg=dict(vision, pool_type="avg", final_ln_after_pool=True)),
  }


@pytest.mark.parametrize("what", list(_unsupported_models()))
def test_inexpressible_open_clip_model_fails_with_one_line(tmp_path, what):
  model_cfg = _unsupported_models()[what]
  _save_dir(tmp_path, open_clip.model.CLIP(**model_cfg), model_cfg)
  with pytest.raises(common.CheckpointImportError) as error:
    importers.read(str(tmp_path))
  assert "\n" not in str(error.value) and what in str(error.value)


@pytest.mark.parametrize("what,keys,model_cfg", [
    ("timm-backbone", ["visual.trunk.stem.0.weight", "visual.head.proj.weight"],
     dict(vision_cfg=dict(timm_model_name="convnext_tiny"))),
    ("Hugging Face text tower", ["visual.conv1.weight", "text.transformer.embeddings.x.weight",
                                 "text.proj.0.weight"], dict(text_cfg=dict(hf_model_name="x"))),
    ("CoCa", ["visual.conv1.weight", "text_decoder.resblocks.0.ln_1.weight"], None),
])
def test_foreign_towers_fail_with_one_line(tmp_path, what, keys, model_cfg):
  """Towers open_clip borrows (timm, Hugging Face) and CoCa, named by config or keys alone."""
  state = {k: torch.zeros(2, 2) for k in keys + ["token_embedding.weight", "logit_scale"]}
  if model_cfg:
    (tmp_path / "open_clip_config.json").write_text(json.dumps(dict(model_cfg=model_cfg)))
  safetensors_torch.save_file(state, str(tmp_path / "open_clip_model.safetensors"))
  paths = [str(tmp_path / "open_clip_model.safetensors")] + ([str(tmp_path)] if model_cfg else [])
  for path in paths:
    with pytest.raises(common.CheckpointImportError) as error:
      importers.read(path, format="open_clip")
    assert "\n" not in str(error.value) and what in str(error.value)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, the files are not.
def test_torchscript_archive_is_refused(tmp_path):
  """OpenAI's original .pt files are TorchScript: loading one runs its code, so it is not."""
  torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "ViT-B-16.pt"))
  with pytest.raises(common.CheckpointImportError, match="TorchScript"):
    importers.read(str(tmp_path / "ViT-B-16.pt"), format="open_clip")


def test_clip_bpe_ids_equal_open_clip_tokenize(tmp_path):
  """Our tokenizer from open_clip's packaged vocabulary gives open_clip.tokenize's ids (sot
  ... eot, 0-padded; truncated texts keep eot last), also after a save / load round trip."""
  texts = utils.varied_texts()
  for length in (77, 16):
    ours = clip_bpe.tokenizer(length)
    want = open_clip.tokenize(texts, context_length=length).numpy()
    got = ours.encode(texts)
    bad = [t for t, g, w in zip(texts, got, want) if not np.array_equal(g, w)]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[0]!r}"
  ours.save(str(tmp_path))
  np.testing.assert_array_equal(tokenizer_lib.load(str(tmp_path)).encode(texts), want)
