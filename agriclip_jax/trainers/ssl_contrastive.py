"""Joint self-supervised + contrastive training: `config.trainer = "ssl_contrastive"`.

One image tower learns from both losses on the same batch: the image-text contrastive loss
(CLIP/SigLIP, as in `contrastive.py`) and DINO's self-distillation loss on multi-crop views of
the same images (a DINO head on the image tower's pooled features, an EMA teacher of tower +
head, centering, temperatures and schedules as in `dino.py`). Each loss has its own weight
schedule: `loss_weights.<loss> = dict(start=..., end=...)`, a cosine over the run.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from agriclip_jax import config_lib
from agriclip_jax import optim
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess
from agriclip_jax.models import dino as dino_model
from agriclip_jax.models import two_towers
from agriclip_jax.models import vit
from agriclip_jax.trainers import common
from agriclip_jax.trainers import contrastive
from agriclip_jax.trainers import dino
from agriclip_jax.trainers import step as step_lib

OPEN_FIELDS = ("evals", "model.img", "model.txt", "model.dino_head")
TEACHER_PARTS = ("img", "dino_head")  # What the EMA teacher holds.


def default_config() -> ml_collections.ConfigDict:
  config = contrastive.default_config()
  config.trainer = "ssl_contrastive"
  config.model.dino_head = dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256,
                                num_layers=3, norm_last_layer=True)
  config.dino = dino.dino_fields()
  config.loss_weights = dict(contrastive=dict(start=1.0, end=1.0),
                             dino=dict(start=1.0, end=1.0))
  return config


def train(config: ml_collections.ConfigDict, workdir: str):
  done = common.finished(config, workdir)
  if done is not None:
    return done
  if set(config.loss_weights.keys()) != {"contrastive", "dino"}:
    raise config_lib.ConfigError("config.loss_weights needs exactly 'contrastive' and 'dino' "
                                 f"(got {sorted(config.loss_weights.keys())})")
  if config.micro_batches != 1:
    raise config_lib.ConfigError(
        "config.micro_batches (the embedding cache) is implemented for the contrastive trainer "
        "only; the joint trainer takes its whole batch at once")
  if config.image_cache.enabled:
    raise config_lib.ConfigError(
        "config.image_cache (LiT from cached image features) needs a locked image tower; the "
        "joint trainer trains it")
  two_towers.require_vit(config.model.img, "joint training")
  setup, tokenizer, towers = contrastive.setup_with_text(config, workdir)
  image_tower = vit.Model(**towers.image)  # The `img` tower alone, for the views.
  head = dino_model.Head(**config.model.dino_head)
  d, image_size, text_len = config.dino, config.input.image_size, config.tokenizer.max_len

  def model_init(rng):
    params = towers.init(rng, jnp.zeros((1, image_size, image_size, 3)),
                         jnp.zeros((1, text_len), jnp.int32))["params"]
    features = jnp.zeros((1, towers.image["width"]))
    params["dino_head"] = head.init(jax.random.fold_in(rng, 1), features)["params"]
    return params

  def extra_state(params):
    return {"teacher": {k: jax.tree.map(jnp.copy, params[k]) for k in TEACHER_PARTS},
            "center": jnp.zeros((config.model.dino_head.out_dim,), jnp.float32)}

  spec, tx, lr_schedule = setup.state_spec(model_init, extra_state=extra_state)
  normalize = functools.partial(preprocess.normalize, mean=config.input.mean,
                                std=config.input.std)
  contrastive_objective = contrastive.make_objective(
      towers, config.loss, normalize, config.loss_targets, config.loss_targets_weight,
      config.loss_chunk_size, setup.mesh, config.input.batch_size, config.logit_precision)
  weights = {k: optim.cosine(w.start, w.end, config.total_steps)
             for k, w in config.loss_weights.items()}

  def views_logits(parts, images, rng=None):
    _, out = image_tower.apply({"params": parts["img"]}, normalize(images),
                               train=rng is not None,
                               rngs={} if rng is None else {"dropout": rng})
    return head.apply({"params": parts["dino_head"]}, out["pre_logits"].astype(jnp.float32))

  teacher = dino.Teacher(config, views_logits, parts=TEACHER_PARTS)

  def objective(params, batch, rng, context):
    w_contrastive, w_dino = (weights[k](context["step"]) for k in ("contrastive", "dino"))
    loss_c, metrics = contrastive_objective(
        {k: v for k, v in params.items() if k != "dino_head"}, batch, rng)
    loss_d = teacher.loss(views_logits, params, context, rng)
    metrics.update({"loss/contrastive": loss_c, "loss/dino": loss_d,
                    "weight/contrastive": w_contrastive, "weight/dino": w_dino})
    return w_contrastive * loss_c + w_dino * loss_d, metrics

  step = step_lib.train_step(objective, tx, spec.labels, lr_schedule, hook=teacher)

  crops = preprocess.dino_crops(d.global_size, d.local_size, d.num_local, d.global_scale,
                                d.local_scale)

  image_and_text = contrastive.transforms(config, setup, tokenizer)

  def make_transform(component):
    return pipeline.MultiCropTransform(crops, image_key=component["image_key"],
                                       also=image_and_text(component))

  def encode_images(params, images):
    return towers.apply({"params": params}, normalize(images), None)[0]

  def encode_texts(params, tokens):
    return towers.apply({"params": params}, None, tokens)[1]

  return setup.run(spec, step, make_transform, encode_images, encode_texts, tokenizer)
