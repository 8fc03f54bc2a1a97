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

import jax
import jax.numpy as jnp
import ml_collections
import optax

from agriclip_jax import optim
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess
from agriclip_jax.losses import dino as dino_loss
from agriclip_jax.models import dino as dino_model
from agriclip_jax.models import two_towers
from agriclip_jax.pytree import flatten, unflatten
from agriclip_jax.trainers import common

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


def teacher_update(state, student, teacher_logits, momentum, center_momentum: float) -> dict:
  """The new teacher (EMA of the `student` parameters it mirrors) and output center."""
  return {"teacher": dino_loss.ema(state["teacher"], student, momentum),
          "center": dino_loss.update_center(state["center"], teacher_logits, center_momentum)}


def make_step(model, tx, labels, lr_schedule, config, normalize):
  """The DINO step: teacher forward, student loss + update, teacher EMA, center update."""
  d, total = config.dino, config.total_steps
  teacher_temp = optim.warmup_then_constant(d.warmup_teacher_temp, d.teacher_temp,
                                            d.warmup_teacher_temp_steps)
  momentum = optim.cosine(d.teacher_momentum, d.teacher_momentum_end, total)
  end = config.optim.weight_decay_end
  weight_decay = optim.cosine(config.optim.weight_decay,
                              config.optim.weight_decay if end is None else end, total)

  def apply(params, images, rng):
    return model.apply({"params": params}, normalize(images), train=True,
                       rngs={"dropout": rng})[0]

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    global_views, local_views = views(batch, d.num_local)
    teacher = split_views(
        model.apply({"params": state["teacher"]}, normalize(global_views))[0], 2)
    temp = teacher_temp(state["step"])
    trainable, frozen = optim.split(state["params"], labels)

    def objective(t):
      outputs = student_outputs(apply, optim.merge(t, frozen), global_views, local_views,
                                d.num_local, rng)
      return dino_loss.loss(outputs, teacher, state["center"], d.student_temp, temp)

    loss, grads = jax.value_and_grad(objective)(trainable)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    updates = freeze_last_layer(updates, state["step"], d.freeze_last_layer_steps)
    params = optim.merge(optax.apply_updates(trainable, updates), frozen)
    m = momentum(state["step"])
    probs = jax.nn.softmax((teacher[0] - state["center"]) / temp, axis=-1)
    metrics = {
        "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state["step"]),
        "teacher_temp": temp, "teacher_momentum": m,
        "weight_decay": weight_decay(state["step"]),
        "teacher/entropy": jnp.mean(-jnp.sum(probs * jnp.log(probs + 1e-12), axis=-1)),
        "center/norm": jnp.linalg.norm(state["center"]),
    }
    return dict(state, step=state["step"] + 1, params=params, opt_state=opt_state,
                **teacher_update(state, params, teacher, m, d.center_momentum)), metrics

  return step


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
