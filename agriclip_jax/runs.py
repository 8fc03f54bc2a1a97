"""A finished run's workdir as a model to use: config, tokenizer, parameters, encoders.

Evaluation jobs, the alignment stage and the predict / embed commands load runs this way.
Parameters are placed on the given mesh with the run's own sharding rules, so a model that
was trained sharded is evaluated sharded.
"""

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import sharding
from agriclip_jax.input import preprocess
from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.models import classifier
from agriclip_jax.models import dino as dino_model
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


def load(workdir: str, mesh: jax.sharding.Mesh) -> Run:
  """The run in `workdir` at its latest checkpoint, on `mesh`."""
  workdir = config_lib.absolute(workdir)
  config = state_lib.run_config(workdir)
  if config.trainer == "align":
    return _load_agriclip(config, workdir, mesh)
  normalize = _normalizer(config)
  entry = "teacher" if config.trainer == "dino" else "params"
  params, step, params_sharding = _load_params(workdir, entry, config, mesh)
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
  if config.trainer == "supervised":  # Backbone features, before the class head.
    tower = vit.Model(**classifier.make(config.model, None).image)  # No head: pre-logits.

    def features(p, x):
      _, out = tower.apply({"params": p["img"]}, normalize(x))
      return two_towers.l2_normalize(out["pre_logits"].astype(jnp.float32))

    return Run(workdir, config, step, params, params_sharding, image_size, features)
  raise config_lib.ConfigError(f"{workdir}: a {config.trainer!r} run has no model to "
                               "evaluate (use the runs it reads)")


def _load_agriclip(config, workdir: str, mesh) -> Run:
  """An align run as the AgriCLIP model: image -> DINO -> aligner, CLIP text tower."""
  from agriclip_jax.trainers import align  # pylint: disable=g-import-not-at-top  (cycle)
  towers = align.Towers(config, workdir, mesh)
  weights, bias, path = align.load_aligner(config, workdir)
  towers.params["aligner"] = jax.device_put({"W": jnp.asarray(weights),
                                             "b": jnp.asarray(bias)}, towers.replicated)
  return Run(workdir, config, int(os.path.getmtime(path)), towers.params,
             towers.params_sharding, towers.image_size, towers.aligned, towers.texts,
             towers.tokenizer, scale=towers.runs["clip"].logit_scale)


def _load_params(workdir, entry, config, mesh):
  """A checkpoint entry sharded by the run's own rules on this mesh."""
  abstract, _ = state_lib.checkpoint_shapes(workdir, entry)
  shardings = sharding.param_shardings(mesh, abstract, config.sharding_rules,
                                       config.get("fsdp_min_size", 2**14))
  params, step = state_lib.load_entry(workdir, entry, shardings)
  return params, step, shardings
