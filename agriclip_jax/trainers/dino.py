"""DINO self-supervised training of an image tower: `config.trainer = "dino"`.

A student ViT + head learns to match an EMA teacher's centred, sharpened outputs across
multi-crop views: two global crops (which the teacher sees) and `num_local` local crops.
The state adds the teacher's parameters and the output center to the usual entries;
evaluators (k-NN) see the teacher. Defaults are DINO's (REFERENCES.md): student temperature
0.1, teacher 0.04 (with optional warm-up), center momentum 0.9, teacher EMA 0.996 -> 1
(cosine), weight decay 0.04 -> 0.4 (cosine), per-parameter gradient clipping at 3, last layer
frozen for the first `freeze_last_layer_steps`.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from agriclip_jax import optim
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess
from agriclip_jax.losses import dino as dino_loss
from agriclip_jax.models import dino as dino_model
from agriclip_jax.models import two_towers
from agriclip_jax.pytree import flatten, unflatten
from agriclip_jax.trainers import common
from agriclip_jax.trainers import step as step_lib

OPEN_FIELDS = ("evals", "model.img", "model.head")


def dino_fields() -> dict:
  return dict(
      global_size=224, local_size=96, num_local=8, global_scale=(0.4, 1.0),
      local_scale=(0.05, 0.4), student_temp=0.1, teacher_temp=0.04,
      warmup_teacher_temp=0.04, warmup_teacher_temp_steps=0, center_momentum=0.9,
      teacher_momentum=0.996, teacher_momentum_end=1.0, freeze_last_layer_steps=0)


def default_config() -> ml_collections.ConfigDict:
  """Every field this trainer reads, with its default."""
  config = common.base_config()
  config.trainer = "dino"
  config.model = dict(
      img=dict(preset="", variant="S/16", pool_type="tok"),
      head=dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, num_layers=3,
                norm_last_layer=True),
      dtype="float32")
  config.dino = dino_fields()
  config.optim.update(lr=5e-4, weight_decay=0.04, clip_norm=3.0, clip_mode="per_param",
                      b2=0.999)
  config.optim.weight_decay_end = 0.4
  return config


def _interleave(arrays):
  """[B, ...] x V -> [B * V, ...], example-major (an example's views adjacent). With the batch
  split over devices, each device's rows stay on it; concatenating the views instead would
  move rows between devices (all-to-alls and permutes in every step)."""
  stacked = jnp.stack(arrays, axis=1)
  return stacked.reshape(-1, *stacked.shape[2:])


def split_views(outputs, num_views: int) -> list:
  """The inverse of `views`' layout: [B * V, ...] -> V arrays of [B, ...]."""
  grouped = outputs.reshape(-1, num_views, *outputs.shape[1:])
  return [grouped[:, v] for v in range(num_views)]


def views(batch, num_local: int):
  """(the two global crops, the local crops or None) of a batch, each set in one array whose
  rows `split_views` separates again."""
  global_views = _interleave([batch["global_0"], batch["global_1"]])
  if not num_local:
    return global_views, None
  return global_views, _interleave([batch[f"local_{i}"] for i in range(num_local)])


def student_outputs(apply, params, global_views, local_views, num_local, rng):
  """Prototype logits of every view, one array per view, global views first."""
  outputs = split_views(apply(params, global_views, rng), 2)
  if num_local:
    outputs += split_views(apply(params, local_views, rng), num_local)
  return outputs


def freeze_last_layer(updates, step, freeze_steps: int):
  """Zeroes the head's last-layer updates before `freeze_steps` (DINO's first-epoch freeze;
  its optimizer moments still see the gradients, unlike PyTorch's grad=None)."""
  frozen = step < freeze_steps
  return unflatten({k: jnp.where(frozen, 0.0, u) if "last_layer/" in k else u
                    for k, u in flatten(updates).items()})


class Teacher(step_lib.StepHook):
  """DINO's EMA teacher in the shared step (the DINO and joint trainers): its schedules
  (temperature warm-up, momentum cosine), its targets for the two global views before the
  student's gradient, the last-layer freeze, and its EMA and center update afterwards.

  `logits(teacher_params, images)` gives the teacher's prototype logits; `parts` names the
  parameter subtrees it mirrors (None: all of them).
  """

  def __init__(self, config, logits: Callable, parts: tuple[str, ...] | None = None):
    self.dino, self.logits, self.parts = config.dino, logits, parts
    d = config.dino
    self.temp = optim.warmup_then_constant(d.warmup_teacher_temp, d.teacher_temp,
                                           d.warmup_teacher_temp_steps)
    self.momentum = optim.cosine(d.teacher_momentum, d.teacher_momentum_end,
                                 config.total_steps)

  def before(self, state, batch):
    global_views, local_views = views(batch, self.dino.num_local)
    return dict(step=state["step"], global_views=global_views, local_views=local_views,
                targets=split_views(self.logits(state["teacher"], global_views), 2),
                temp=self.temp(state["step"]), center=state["center"])

  def loss(self, apply: Callable, params, context, rng):
    """The DINO loss of the student `apply(params, images, rng) -> logits` on every view."""
    outputs = student_outputs(apply, params, context["global_views"], context["local_views"],
                              self.dino.num_local, rng)
    return dino_loss.loss(outputs, context["targets"], context["center"],
                          self.dino.student_temp, context["temp"])

  def edit_updates(self, updates, step):
    return freeze_last_layer(updates, step, self.dino.freeze_last_layer_steps)

  def after(self, state, params, context):
    m = self.momentum(state["step"])
    student = params if self.parts is None else {k: params[k] for k in self.parts}
    center, temp = context["center"], context["temp"]
    probs = jax.nn.softmax((context["targets"][0] - center) / temp, axis=-1)
    entries = {"teacher": dino_loss.ema(state["teacher"], student, m),
               "center": dino_loss.update_center(center, context["targets"],
                                                 self.dino.center_momentum)}
    return entries, {
        "teacher_temp": temp, "teacher_momentum": m,
        "teacher/entropy": jnp.mean(-jnp.sum(probs * jnp.log(probs + 1e-12), axis=-1)),
        "center/norm": jnp.linalg.norm(center)}


def make_step(model, tx, labels, lr_schedule, config, normalize):
  """The DINO step: the shared step with the teacher hooked in."""
  end = config.optim.weight_decay_end
  weight_decay = optim.cosine(config.optim.weight_decay,
                              config.optim.weight_decay if end is None else end,
                              config.total_steps)
  teacher = Teacher(
      config, lambda params, images: model.apply({"params": params}, normalize(images))[0])

  def apply(params, images, rng):
    return model.apply({"params": params}, normalize(images), train=True,
                       rngs={"dropout": rng})[0]

  def objective(params, batch, rng, context):
    del batch  # The views are in the context.
    return (teacher.loss(apply, params, context, rng),
            {"weight_decay": weight_decay(context["step"])})

  return step_lib.train_step(objective, tx, labels, lr_schedule, hook=teacher)


def train(config: ml_collections.ConfigDict, workdir: str):
  done = common.finished(config, workdir)
  if done is not None:
    return done
  setup = common.Setup.create(config, workdir, feature_keys=("image_key",))
  model = dino_model.make(config.model)
  d = config.dino
  size = d.global_size

  def model_init(rng):
    return model.init(rng, jnp.zeros((1, size, size, 3)))["params"]

  def extra_state(params):  # The teacher starts as a copy of the student.
    return {"teacher": jax.tree.map(jnp.copy, params),
            "center": jnp.zeros((config.model.head.out_dim,), jnp.float32)}

  spec, tx, lr_schedule = setup.state_spec(model_init, extra_state=extra_state,
                                           eval_key="teacher")
  normalize = functools.partial(preprocess.normalize, mean=config.input.mean,
                                std=config.input.std)
  crops = preprocess.dino_crops(d.global_size, d.local_size, d.num_local, d.global_scale,
                                d.local_scale)

  def make_transform(component):
    return pipeline.MultiCropTransform(crops, image_key=component["image_key"])

  def encode_images(params, images):  # Backbone features, for k-NN evaluation.
    return two_towers.l2_normalize(
        model.apply({"params": params}, normalize(images))[1].astype(jnp.float32))

  step = make_step(model, tx, spec.labels, lr_schedule, config, normalize)
  return setup.run(spec, step, make_transform, encode_images)
