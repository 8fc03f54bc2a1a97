"""predict / embed / inspect on an imported checkpoint (a Hugging Face CLIP directory): the
same probabilities transformers gives for our preprocessing of the same files."""

import io
import json

import numpy as np
from PIL import Image
import pytest

from agriclip_jax import embed
from agriclip_jax import predict
from agriclip_jax.input import preprocess
from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.models import inspect
import importer_utils as utils

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

LABELS = ["red spotted leaf", "green plain cow", "white spotted cow"]


def _photos(directory):
  directory.mkdir()
  rng = np.random.default_rng(0)
  for i, size in enumerate([(40, 30), (32, 50)]):
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(directory / f"photo{i}.png")
  (directory / "broken.jpg").write_bytes(b"not a jpeg")
  return directory


def _reference_probabilities(reference, files, tokenizer):
  pixels = []
  for path in files:
    with open(path, "rb") as f:
      image = preprocess.eval_image(f.read(), 32).astype(np.float32) / 255
    pixels.append(((image - preprocess.CLIP_MEAN) / preprocess.CLIP_STD).transpose(2, 0, 1))
  tokens = tokenizer.encode([f"a photo of a {label}." for label in LABELS])
  with torch.no_grad():
    img = reference.get_image_features(pixel_values=torch.tensor(np.stack(pixels)))
    txt = reference.get_text_features(input_ids=torch.tensor(tokens.astype(np.int64)))
  img = utils.normalize(getattr(img, "pooler_output", img).numpy())
  txt = utils.normalize(getattr(txt, "pooler_output", txt).numpy())
  logits = float(reference.logit_scale.detach().exp()) * img @ txt.T
  logits -= logits.max(1, keepdims=True)
  return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def test_predict_and_embed_with_a_hugging_face_clip_directory(tmp_path, capsys):
  checkpoint = tmp_path / "hf"
  reference = utils.hf_clip_with_tokenizer(checkpoint).eval()
  photos = _photos(tmp_path / "photos")
  code = predict.main(["--checkpoint", str(checkpoint), "--labels", ",".join(LABELS),
                       "--templates", "a photo of a {}.", "--format", "json", "--top-k", "3",
                       str(photos)])
  captured = capsys.readouterr()
  assert code == 1 and "skipped" in captured.err and "broken.jpg" in captured.err
  result = json.loads(captured.out)
  files = [p["image"] for p in result["predictions"]]
  assert [f.rsplit("/", 1)[-1] for f in files] == ["photo0.png", "photo1.png"]
  tokenizer = tokenizer_lib.from_pretrained(str(checkpoint), 16)
  want = _reference_probabilities(reference, files, tokenizer)
  for row, prediction in zip(want, result["predictions"]):
    got = {entry["class"]: entry["probability"] for entry in prediction["top"]}
    np.testing.assert_allclose([got[label] for label in LABELS], row, atol=1e-4)

  out = tmp_path / "embeddings.npy"
  assert embed.main(["--checkpoint", str(checkpoint), "--out", str(out),
                     str(photos / "photo0.png")]) == 0
  assert np.load(out).shape == (1, 32)
  capsys.readouterr()

  assert inspect.main([str(checkpoint), "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["format"] == "hf_clip" and info["tokenizer"] == "included"
  assert info["model"]["img"]["width"] == 32 and info["context_length"] == 16
  # Ours: the class token's position embedding (32 numbers) is folded into the class token.
  assert info["parameters"] == sum(p.numel() for p in reference.parameters()) - 32


def test_predict_with_an_unknown_file_is_one_line(tmp_path, capsys):
  junk = tmp_path / "weights.bin"
  junk.write_bytes(b"junk")
  (tmp_path / "p.png").write_bytes(_png())
  code = predict.main(["--checkpoint", str(junk), "--labels", "a,b", str(tmp_path / "p.png")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
  assert "not a checkpoint format this project reads" in err[0]


def _png() -> bytes:
  out = io.BytesIO()
  Image.new("RGB", (8, 8)).save(out, format="PNG")
  return out.getvalue()


def test_taxonomy_and_class_files_with_a_utf8_byte_order_mark(tmp_path):
  (tmp_path / "taxonomy.csv").write_text("species,genus\nQuercus robur,Quercus\n"
                                         "Quercus ilex,Quercus\n", encoding="utf-8-sig")
  (tmp_path / "classes.txt").write_text("oak\nash\n", encoding="utf-8-sig")
  args = predict.parse(["--checkpoint", "x", "--taxonomy", str(tmp_path / "taxonomy.csv"),
                        "--rank", "genus", "p.png"])
  assert predict.read_classes(args) == (["Quercus robur", "Quercus ilex"], ["Quercus"], [0, 0])
  args.rank = "species"  # The first column: named as written, without the mark.
  assert predict.read_classes(args)[1] == ["Quercus ilex", "Quercus robur"]
  args = predict.parse(["--checkpoint", "x", "--classes", str(tmp_path / "classes.txt"), "p.png"])
  assert predict.read_classes(args)[0] == ["oak", "ash"]


def test_embed_with_an_image_only_hugging_face_vit_directory(tmp_path, capsys):
  """An image tower alone (a ViTModel directory whose preprocessor_config.json says ImageNet's
  mean and std): embed gives transformers' class-token output for those pixels, L2-normalised,
  and asking it for text embeddings is one line."""
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  reference = transformers.ViTModel(transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
      image_size=32, patch_size=8)).eval()
  checkpoint = tmp_path / "vit"
  reference.save_pretrained(checkpoint)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  (checkpoint / "preprocessor_config.json").write_text(json.dumps(
      {"image_mean": mean, "image_std": std, "size": {"height": 32, "width": 32}}))
  photos = _photos(tmp_path / "photos")
  out = tmp_path / "vit.npy"
  files = [photos / "photo0.png", photos / "photo1.png"]
  assert embed.main(["--checkpoint", str(checkpoint), "--out", str(out), *map(str, files)]) == 0
  pixels = []
  for path in files:
    image = preprocess.eval_image(path.read_bytes(), 32).astype(np.float32) / 255
    pixels.append(((image - np.array(mean)) / np.array(std)).astype(np.float32).transpose(2, 0, 1))
  with torch.no_grad():
    want = reference(pixel_values=torch.tensor(np.stack(pixels))).last_hidden_state[:, 0].numpy()
  np.testing.assert_allclose(np.load(out), utils.normalize(want), atol=1e-5)
  (tmp_path / "texts.txt").write_text("a cow\n")
  capsys.readouterr()
  assert embed.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "t.npy"),
                     "--texts", str(tmp_path / "texts.txt")]) == 2
  assert capsys.readouterr().err.splitlines() == [
      f"error: {checkpoint} is an imported image tower (hf_vit): it has no text tower"]
