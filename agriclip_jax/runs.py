"""A finished run's workdir, or an imported checkpoint, as a model to use: config, tokenizer,
parameters, encoders.

Evaluation jobs, the alignment stage and the predict / embed commands load models this way:
a run's workdir, or any checkpoint `models.importers` reads (a Hugging Face CLIP / SigLIP /
DINOv2 directory, an open_clip directory or file, a timm / big_vision / DINO file), with that
checkpoint's own tokenizer and preprocessing. Parameters are placed on the given mesh with the
run's own sharding rules, so a model that was trained sharded is evaluated sharded.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import files
from agriclip_jax import pytree
from agriclip_jax import sharding
from agriclip_jax.input import preprocess
from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.models import classifier
from agriclip_jax.models import dino as dino_model
from agriclip_jax.models import importers
from agriclip_jax.models import two_towers
from agriclip_jax.models import vit
from agriclip_jax.trainers import state as state_lib

IMAGE_TEXT_TRAINERS = ("contrastive", "ssl_contrastive")


@dataclasses.dataclass(eq=False)
class Run:
  workdir: str
  config: Any
  step: int
  params: Any
  params_sharding: Any
  image_size: int
  # (params, uint8 images) -> L2-normalised embeddings (image-text runs) or features.
  encode_images: Callable[[Any, jax.Array], jax.Array]
  # (params, tokens) -> L2-normalised text embeddings; None for image-only runs.
  encode_texts: Callable[[Any, jax.Array], jax.Array] | None = None
  tokenizer: tokenizer_lib.Tokenizer | None = None
  scale: float | None = None  # The logit scale, when it is not in `params`.
  # Imported checkpoints: the file's modification time; WiSE-FT mixes: also alpha and base.
  revision: Any = 0

  @property
  def key(self) -> tuple:
    """What caches of this model's outputs are keyed by."""
    return (config_lib.absolute(self.workdir), self.step, self.revision)

  @property
  def has_text(self) -> bool:
    return self.encode_texts is not None

  @property
  def logit_scale(self) -> float:
    """The learned scale of image-text cosines (probabilities use it); 100 if none."""
    if self.scale is not None:
      return self.scale
    if "logit_scale" not in self.params:
      return 100.0
    max_scale = self.config.model.get("max_logit_scale", 100.0)
    return float(np.exp(min(float(np.asarray(self.params["logit_scale"])),
                            np.log(max_scale))))


def _normalizer(config):
  return functools.partial(preprocess.normalize, mean=tuple(config.input.mean),
                           std=tuple(config.input.std))


def is_run(path: str) -> bool:
  """Whether `path` is a workdir of this project's (its config.json names a trainer)."""
  config_path = files.path(path) / "config.json"
  if not config_path.is_file():
    return False
  try:
    return "trainer" in files.read_json(config_path)
  except (OSError, ValueError):
    return False


def load(workdir: str, mesh: jax.sharding.Mesh, format: str | None = None,  # pylint: disable=redefined-builtin
         tokenizer: str | None = None, step: int | None = None) -> Run:
  """The run in `workdir` at its latest checkpoint (or at `step`), or an imported checkpoint
  (`format` detected unless given; `tokenizer` a tokenizer directory for checkpoints without
  one)."""
  workdir = config_lib.absolute(workdir)
  if format or not is_run(workdir):
    if step is not None:
      raise config_lib.ConfigError(f"{workdir} is not a run of this project: it has no steps")
    return load_imported(workdir, mesh, format, tokenizer)
  config = state_lib.run_config(workdir)
  if config.trainer == "align":
    if step is not None:
      raise config_lib.ConfigError(f"{workdir} is an align run: it has no steps")
    return _load_agriclip(config, workdir, mesh)
  if config.trainer not in (*IMAGE_TEXT_TRAINERS, "dino", "supervised"):
    raise config_lib.ConfigError(f"{workdir}: a {config.trainer!r} run has no model to "
                                 "evaluate (use the runs it reads)")
  normalize = _normalizer(config)
  entry = "teacher" if config.trainer == "dino" else "params"
  params, step, params_sharding = _load_params(workdir, entry, config, mesh, step)
  image_size = config.input.image_size
  if config.trainer in IMAGE_TEXT_TRAINERS:
    tokenizer = tokenizer_lib.load(workdir)
    model = two_towers.make(config.model, vocab_size=tokenizer.vocab_size)
    towers = {k: v for k, v in params.items() if k != "dino_head"}  # Joint runs' extra head.
    params = towers
    params_sharding = {k: v for k, v in params_sharding.items() if k != "dino_head"}
    return Run(workdir, config, step, params, params_sharding, image_size,
               lambda p, x: model.apply({"params": p}, normalize(x), None)[0],
               lambda p, t: model.apply({"params": p}, None, t)[1], tokenizer)
  if config.trainer == "dino":
    model = dino_model.make(config.model)
    return Run(workdir, config, step, params, params_sharding, config.dino.global_size,
               lambda p, x: two_towers.l2_normalize(
                   model.apply({"params": p}, normalize(x))[1].astype(jnp.float32)))
  # Supervised: backbone features, before the class head.
  tower = vit.Model(**classifier.make(config.model, None).image)  # No head: pre-logits.

  def features(p, x):
    _, out = tower.apply({"params": p["img"]}, normalize(x))
    return two_towers.l2_normalize(out["pre_logits"].astype(jnp.float32))

  return Run(workdir, config, step, params, params_sharding, image_size, features)


def load_imported(path: str, mesh: jax.sharding.Mesh, format: str | None = None,  # pylint: disable=redefined-builtin
                  tokenizer: str | None = None) -> Run:
  """A pretrained checkpoint in another project's format (see `models.importers`)."""
  checkpoint = importers.read(path, format)
  model, params = importers.build(checkpoint)
  revision = _mtime(path)  # Caches keyed by it see a replaced file.
  shapes = jax.eval_shape(lambda p: p, params)
  params_sharding = sharding.param_shardings(mesh, shapes, [(".*", "fsdp")])
  params = jax.device_put(params, params_sharding)
  config = ml_collections.ConfigDict(dict(
      trainer="imported", format=checkpoint.format, model=checkpoint.model,
      input=dict(image_size=checkpoint.image_size, mean=list(checkpoint.mean),
                 std=list(checkpoint.std))))
  normalize = _normalizer(config)
  image_size = checkpoint.image_size or 224
  if "txt" not in checkpoint.model:  # An image tower: its pooled features.
    return Run(path, config, 0, params, params_sharding, image_size,
               lambda p, x: two_towers.l2_normalize(
                   model.apply({"params": p}, normalize(x))[0].astype(jnp.float32)),
               revision=revision)
  length = checkpoint.context_length or 77
  if tokenizer:
    text_tokenizer = tokenizer_lib.from_pretrained(tokenizer, length)
  elif checkpoint.tokenizer is not None:
    text_tokenizer = checkpoint.tokenizer(length)
  else:
    raise config_lib.ConfigError(
        f"{path} ({checkpoint.format}) names no tokenizer: pass a tokenizer directory (e.g. "
        "the matching Hugging Face model's) with --tokenizer")
  return Run(path, config, 0, params, params_sharding, image_size,
             lambda p, x: model.apply({"params": p}, normalize(x), None)[0],
             lambda p, t: model.apply({"params": p}, None, t)[1], text_tokenizer,
             revision=revision)


def interpolate(base: Run, run: Run, alpha: float) -> Run:
  """WiSE-FT: `run` with parameters (1 - alpha) * base + alpha * run, for a run fine-tuned
  from `base` (an imported checkpoint or an earlier run). alpha 0 is the base, 1 the run;
  between, fine-tuning's gains on its domain trade against the base's general skill."""
  flat_base = {k: tuple(v.shape) for k, v in pytree.flatten(base.params).items()}
  flat_run = {k: tuple(v.shape) for k, v in pytree.flatten(run.params).items()}
  if flat_base != flat_run:
    differ = sorted(k for k in set(flat_base) | set(flat_run)
                    if flat_base.get(k) != flat_run.get(k))
    raise config_lib.ConfigError(
        f"WiSE-FT: {base.workdir} and {run.workdir} differ in {len(differ)} parameters, e.g. "
        + ", ".join(f"{k} {flat_base.get(k, 'absent')} vs {flat_run.get(k, 'absent')}"
                    for k in differ[:3]))

  def mix(b, f):
    return ((1 - alpha) * b.astype(jnp.float32) + alpha * f.astype(jnp.float32)).astype(f.dtype)

  params = jax.jit(lambda b, f: jax.tree.map(mix, b, f),
                   out_shardings=run.params_sharding)(base.params, run.params)
  return dataclasses.replace(run, params=params,
                             revision=(run.revision, "wise", float(alpha), base.key))


def _load_agriclip(config, workdir: str, mesh) -> Run:
  """An align run as the AgriCLIP model: image -> DINO -> aligner, CLIP text tower."""
  towers = AgriCLIPTowers(config, workdir, mesh)
  weights, bias, path = load_aligner(config, workdir)
  towers.params["aligner"] = jax.device_put({"W": jnp.asarray(weights),
                                             "b": jnp.asarray(bias)}, towers.replicated)
  return Run(workdir, config, _mtime(path), towers.params,
             towers.params_sharding, towers.image_size, towers.aligned, towers.texts,
             towers.tokenizer, scale=towers.runs["clip"].logit_scale)


def _load_params(workdir, entry, config, mesh, step=None):
  """A checkpoint entry (latest, or `step`'s) sharded by the run's own rules on this mesh."""
  abstract, _ = state_lib.checkpoint_shapes(workdir, entry, step)
  shardings = sharding.param_shardings(mesh, abstract, config.sharding_rules,
                                       config.get("fsdp_min_size", 2**14))
  params, step = state_lib.load_entry(workdir, entry, shardings, step)
  return params, step, shardings


# ------------------------------------------------------------ AgriCLIP (align runs)

ALIGNER = "aligner.npz"  # An align run's fitted map, in its workdir.


class AgriCLIPTowers:
  """The DINO and CLIP runs an align run reads (`config.align.{dino,clip}_workdir`), as one
  parameter tree + encoders; `aligned` is AgriCLIP's image -> DINO -> aligner path."""

  def __init__(self, config, workdir: str, mesh):
    a = config.align
    self.runs = {"dino": load(config_lib.expand_path(a.dino_workdir, workdir), mesh),
                 "clip": load(config_lib.expand_path(a.clip_workdir, workdir), mesh)}
    # The image features: a DINO run, or an imported image tower (DINO ViT / ResNet-50, ...).
    dino = self.runs["dino"]
    if (dino.config.trainer not in ("dino", "imported") or dino.has_text
        or not self.runs["clip"].has_text):
      raise config_lib.ConfigError(
          "align.dino_workdir / clip_workdir must hold a DINO run or an imported image tower, "
          f"and an image-text run or checkpoint; got {dino.config.trainer!r} and "
          f"{self.runs['clip'].config.trainer!r}")
    self.tokenizer = self.runs["clip"].tokenizer
    self.replicated = sharding.replicated(mesh)
    # The aligner is a placeholder until it is fitted (or loaded).
    self.params = {k: run.params for k, run in self.runs.items()}
    self.params["aligner"] = {"W": jnp.zeros((1, 1)), "b": jnp.zeros(1)}
    self.params_sharding = {k: run.params_sharding for k, run in self.runs.items()}
    self.params_sharding["aligner"] = self.replicated
    self.image_size = max(run.image_size for run in self.runs.values())
    self.key = config_lib.fingerprint({k: run.key for k, run in self.runs.items()},
                                      self.image_size)

  def _encode(self, tower: str, params, images):
    size = self.runs[tower].image_size
    if images.shape[1] != size:  # Decoded once at the larger size, resized per tower.
      images = jax.image.resize(images.astype(jnp.float32),
                                (images.shape[0], size, size, 3), "bilinear")
    return self.runs[tower].encode_images(params[tower], images)

  def dino_features(self, params, images):
    return self._encode("dino", params, images)

  def clip_images(self, params, images):
    return self._encode("clip", params, images)

  def aligned(self, params, images):
    x = self.dino_features(params, images).astype(jnp.float32)
    return two_towers.l2_normalize(x @ params["aligner"]["W"] + params["aligner"]["b"])

  def texts(self, params, tokens):
    return self.runs["clip"].encode_texts(params["clip"], tokens)


def load_aligner(config, workdir: str) -> tuple[np.ndarray, np.ndarray, str]:
  """(W, b, path) of the aligner this align run uses: its own or `align.aligner_workdir`'s."""
  source = config_lib.expand_path(config.align.aligner_workdir, workdir) or workdir
  path = files.join(source, ALIGNER)
  if not files.path(path).exists():
    raise config_lib.ConfigError(f"no fitted aligner at {path}")
  with files.path(path).open("rb") as f, np.load(f) as saved:
    return saved["W"], saved["b"], path


def _mtime(path: str) -> int:
  return int(files.mtime(path))
