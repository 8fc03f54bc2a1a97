"""Parity with open_clip: both CLIPs trained on the same batches, scored by the same evaluators.

  python -m agriclip_jax.benchmarks.parity [--config configs/alive_clip.py:demo] \
      [--steps 600] [--seeds 0,1,2] [--out /tmp/agriclip_parity] [--data_dir DIR]

For each seed s:
1. Ours: the config's own trainer runs with `config.seed = s` (initialisation and data order).
   Every batch it reads (uint8 images, int32 tokens) is recorded from its data iterator and
   dumped to `<out>/batches_s<s>/{image,text}.npy`: the exact batches it trained on.
2. open_clip's `CLIP` of the same shape (towers' width, depth, heads, MLP, patch, pooling,
   embedding width, vocabulary and context of our tokenizer), initialised with torch seed s,
   is trained on those batches in the same order, with the same optimizer: AdamW (betas, eps),
   the learning rate our `optim.schedule` gives at each step, global-norm clipping, decoupled
   weight decay on the same kind of parameters (weight matrices and conv kernels; not
   embeddings, biases, norms or the scale), the same logit-scale init and cap.
3. Both are scored by the config's zero-shot evaluators (same eval images and preprocessing,
   prompts, class embeddings and arg-max): ours inside its trainer, open_clip's through the
   same evaluator objects, whose encode functions call its towers via `jax.pure_callback`.

Token layout: ours pads with 0 and ends every text with one end-of-text token, the last
non-zero one; open_clip pools with `pool_type="eos"` at that token (its default, argmax of the
token id, would pool elsewhere since our end-of-text id is 1).
Remaining architectural differences of open_clip's ViT: a LayerNorm before the encoder, a
class token that takes part in attention (average pooling leaves it out), no bias on the patch
embedding or the projections; LayerNorm epsilon 1e-5 (ours 1e-6).

Prints JSON: each seed's top-1 per split for both, and per model and split the mean, min and
max over seeds; `ours_within_spread_or_above` says whether our mean reaches open_clip's min.
Needs torch and open_clip_torch. Single process; results are cached per seed in `<out>`.
"""

import contextlib
import json
import math
import os
import time
from typing import Any, Iterable

from absl import app
from absl import logging
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import optim
from agriclip_jax import sharding
from agriclip_jax.evaluators import base as evaluators
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess
from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.models import text
from agriclip_jax.models import two_towers
from agriclip_jax.models import vit

FLAGS = flags.FLAGS
MODELS = ("ours", "open_clip")


def load_config(spec: str, seed: int, steps: int, data_dir: str):
  config = config_lib.load(spec)
  config.seed = seed
  if steps:
    config.total_steps = steps
  if data_dir:
    config.input.data_dir = data_dir
  # Evaluate and checkpoint once, at the end: what is compared is the final model.
  config.eval_every = config.checkpoint_every = config.total_steps
  return config


@contextlib.contextmanager
def recorded_batches():
  """Yields a list that fills with every batch the trainer's data iterators hand out."""
  batches = []

  class Recording(pipeline.GlobalPositionIterator):

    def __next__(self):
      batch = super().__next__()
      batches.append({k: np.array(v) for k, v in batch.items()})
      return batch

  original = pipeline.GlobalPositionIterator
  pipeline.GlobalPositionIterator = Recording  # train_iterator builds its iterator by name.
  try:
    yield batches
  finally:
    pipeline.GlobalPositionIterator = original


def train_ours(config, workdir: str, batch_dir: str) -> dict[str, Any]:
  """Our trainer's summary; the batches it trained on go to `batch_dir` (a run that finished
  with its batches dumped is reused)."""
  from agriclip_jax import trainers  # pylint: disable=g-import-not-at-top  (heavy)
  if all(os.path.exists(os.path.join(batch_dir, f"{k}.npy")) for k in ("image", "text")):
    return trainers.run(config, workdir)  # Finished: the trainer returns its summary at once.
  if os.path.exists(workdir):
    raise FileExistsError(f"{workdir} exists: its batches would not be recorded; remove it")
  with recorded_batches() as batches:
    summary = trainers.run(config, workdir)
  if len(batches) != config.total_steps:
    raise AssertionError(f"recorded {len(batches)} batches for {config.total_steps} steps")
  os.makedirs(batch_dir, exist_ok=True)
  for key in ("image", "text"):
    np.save(os.path.join(batch_dir, f"{key}.npy"), np.stack([b[key] for b in batches]))
  return summary


def towers(config) -> tuple[vit.Model, text.Model]:
  """Our towers as the config builds them (unbound modules: their fields hold the shape)."""
  img = two_towers.tower_kwargs(config.model.img, "img", config.model.out_dim, "float32")
  txt = two_towers.tower_kwargs(config.model.txt, "txt", config.model.out_dim, "float32")
  return vit.Model(**img), text.Model(**txt)


def check_comparable(config, img: vit.Model, txt: text.Model) -> None:
  """What this benchmark maps onto open_clip; anything else would be compared unfairly."""
  problems = []
  if config.trainer != "contrastive" or config.loss != "softmax":
    problems.append("a softmax contrastive (CLIP) config")
  if not (img.num_classes and txt.num_classes):
    problems.append("both towers with heads (model.img.head, model.txt.head)")
  if img.pool_type not in ("gap", "tok") or txt.pool_type != "eot" or not txt.causal:
    problems.append("image pooling gap or tok, causal text pooled at end-of-text")
  if img.activation != txt.activation or img.activation not in ("gelu", "quick_gelu"):
    problems.append("gelu or quick_gelu in both towers")
  opt = config.optim
  if (opt.name != "adamw" or opt.get("clip_mode", "global") != "global"
      or opt.decay_regex != ".*/kernel" or opt.get("weight_decay_end") is not None
      or [tuple(r) for r in opt.rules] != [(".*", {})]):
    problems.append("plain AdamW: global clipping, decay on kernels, no rules")
  if config.model.get("dtype", "float32") != "float32" or config.input.mixture:
    problems.append("float32, one dataset")
  if problems:
    raise config_lib.ConfigError("the parity benchmark needs " + "; ".join(problems))


def open_clip_model(config, tokenizer: tokenizer_lib.Tokenizer, seed: int):
  """open_clip's CLIP of our towers' shape, initialised with torch seed `seed`."""
  import torch  # pylint: disable=g-import-not-at-top  (optional dependency)
  from open_clip import model as oc  # pylint: disable=g-import-not-at-top
  img, txt = towers(config)
  vision = oc.CLIPVisionCfg(
      layers=img.depth, width=img.width, head_width=img.width // img.num_heads,
      mlp_ratio=img.mlp_dim / img.width, patch_size=img.patch_size,
      image_size=config.input.image_size, pool_type={"gap": "avg", "tok": "tok"}[img.pool_type])
  texts = oc.CLIPTextCfg(
      context_length=tokenizer.max_len, vocab_size=tokenizer.vocab_size, width=txt.width,
      heads=txt.num_heads, layers=txt.depth, mlp_ratio=txt.mlp_dim / txt.width, pad_id=0,
      eos_id=tokenizer.eot_id, pool_type="eos")
  torch.manual_seed(seed)
  return oc.CLIP(config.model.out_dim, vision, texts,
                 quick_gelu=img.activation == "quick_gelu",
                 init_logit_scale=math.log(config.model.logit_scale_init))


def decays(name: str, param) -> bool:
  """Weight decay on weight matrices and conv kernels, as ours decays `kernel`s: not on
  embeddings (token, position, class), biases, norms or the logit scale."""
  return param.ndim >= 2 and "embedding" not in name


def image_tensor(images: np.ndarray, config):
  """uint8 NHWC -> normalised float NCHW, with our normalisation."""
  import torch  # pylint: disable=g-import-not-at-top
  x = np.array(preprocess.normalize(images, config.input.mean, config.input.std))
  return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def train_open_clip(model, batch_dir: str, config) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from open_clip import loss as oc_loss  # pylint: disable=g-import-not-at-top
  images = np.load(os.path.join(batch_dir, "image.npy"), mmap_mode="r")
  tokens = np.load(os.path.join(batch_dir, "text.npy"), mmap_mode="r")
  opt = config.optim
  named = list(model.named_parameters())
  optimizer = torch.optim.AdamW(
      [dict(params=[p for n, p in named if decays(n, p)], weight_decay=opt.weight_decay),
       dict(params=[p for n, p in named if not decays(n, p)], weight_decay=0.0)],
      lr=0.0, betas=(opt.b1, opt.b2), eps=opt.eps)
  lr_schedule = optim.schedule(opt, config.total_steps)
  loss_fn = oc_loss.ClipLoss()
  max_log_scale = math.log(config.model.max_logit_scale)
  model.train()
  for step in range(config.total_steps):
    for group in optimizer.param_groups:
      group["lr"] = float(lr_schedule(step))
    zimg = model.encode_image(image_tensor(np.array(images[step]), config), normalize=True)
    ztxt = model.encode_text(torch.from_numpy(np.array(tokens[step], np.int64)),
                             normalize=True)
    loss = loss_fn(zimg, ztxt, model.logit_scale.exp())
    if not torch.isfinite(loss):
      raise FloatingPointError(f"open_clip loss is {loss.item()} at step {step}")
    if config_lib.every(step + 1, config.log_every, config.total_steps):
      logging.info("open_clip step %d: loss %.4f, logit scale %.2f", step + 1, loss.item(),
                   model.logit_scale.exp().item())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_norm)
    optimizer.step()
    with torch.no_grad():  # As open_clip's training loop caps the scale, after the step.
      model.logit_scale.clamp_(0, max_log_scale)
  model.eval()


def open_clip_context(model, config, tokenizer) -> evaluators.Context:
  """The evaluators' context with open_clip's towers as the encode functions."""
  import torch  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  out_dim = config.model.out_dim

  def host(encode):
    def call(x):
      with torch.no_grad():
        return encode(x).numpy().astype(np.float32)
    return call

  embed_images = host(lambda x: model.encode_image(
      torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(), normalize=True))
  embed_texts = host(lambda t: model.encode_text(
      torch.from_numpy(np.asarray(t, np.int64)), normalize=True))

  def encode_images(params, images):
    del params
    x = preprocess.normalize(images, config.input.mean, config.input.std)
    return jax.pure_callback(embed_images,
                             jax.ShapeDtypeStruct((images.shape[0], out_dim), jnp.float32), x)

  def encode_texts(params, tokens):
    del params
    return jax.pure_callback(embed_texts,
                             jax.ShapeDtypeStruct((tokens.shape[0], out_dim), jnp.float32),
                             tokens)

  return evaluators.Context(
      mesh=mesh, params_sharding=sharding.replicated(mesh),
      params_abstract=jax.ShapeDtypeStruct((), jnp.float32), encode_images=encode_images,
      encode_texts=encode_texts, tokenizer=tokenizer, dataset=config.input.dataset,
      data_dir=config.input.data_dir or None, image_size=config.input.image_size,
      batch_size=config.eval_batch_size or config.input.batch_size,
      num_threads=config.input.num_threads)


def evaluate(config, context: evaluators.Context) -> dict[str, float]:
  """{evaluator name: top-1} from the config's evaluators (no parameters: open_clip's are in
  the context's encode functions)."""
  params = jnp.zeros((), jnp.float32)
  return {name: evaluator.run(params)["top1"]
          for name, _, evaluator in evaluators.build(config.evals, context, config.eval_every)}


def run_seed(spec: str, seed: int, steps: int, out: str, data_dir: str) -> dict[str, Any]:
  config = load_config(spec, seed, steps, data_dir)
  check_comparable(config, *towers(config))
  workdir = os.path.join(config_lib.absolute(out), f"ours_s{seed}")
  batch_dir = os.path.join(config_lib.absolute(out), f"batches_s{seed}")
  start = time.time()
  summary = train_ours(config, workdir, batch_dir)
  ours_seconds = time.time() - start
  tokenizer = tokenizer_lib.load(workdir)
  start = time.time()
  model = open_clip_model(config, tokenizer, seed)
  train_open_clip(model, batch_dir, config)
  open_clip_seconds = time.time() - start
  return {"seed": seed, "steps": config.total_steps,
          "ours": {name: summary[f"{name}/top1"] for name in config.evals},
          "open_clip": evaluate(config, open_clip_context(model, config, tokenizer)),
          "seconds": {"ours": round(ours_seconds, 1), "open_clip": round(open_clip_seconds, 1)}}


def summarize(runs: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """Per model and split: mean, min, max of top-1 over the runs; per split, whether ours'
  mean reaches open_clip's min (within its spread or above)."""
  runs = list(runs)
  splits = sorted(runs[0]["ours"])
  stats = {model: {split: _spread([r[model][split] for r in runs]) for split in splits}
           for model in MODELS}
  verdict = {split: stats["ours"][split]["mean"] >= stats["open_clip"][split]["min"]
             for split in splits}
  return {"summary": stats, "ours_within_spread_or_above": verdict}


def _spread(values: list[float]) -> dict[str, float]:
  return {"mean": round(float(np.mean(values)), 4), "min": round(float(np.min(values)), 4),
          "max": round(float(np.max(values)), 4)}


def main(argv) -> None:
  del argv
  # Before TensorFlow (which the trainers' TFDS imports): loaded after it, the native library
  # of triton (torch imports it) crashes the process.
  import open_clip  # pylint: disable=g-import-not-at-top,unused-import
  import torch  # pylint: disable=g-import-not-at-top
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  from agriclip_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.quiet_library_logs()
  distributed.hide_accelerators_from_tensorflow()
  if jax.process_count() != 1:
    raise SystemExit("the parity benchmark runs in one process")
  os.makedirs(FLAGS.out, exist_ok=True)
  runs = []
  for seed in map(int, FLAGS.seeds):
    cached = os.path.join(FLAGS.out, f"result_s{seed}.json")
    if not os.path.exists(cached):
      result = run_seed(FLAGS.config, seed, FLAGS.steps, FLAGS.out, FLAGS.data_dir)
      with open(cached, "w") as f:
        json.dump(result, f)
    with open(cached) as f:
      runs.append(json.load(f))
  report = {"config": FLAGS.config, "steps": runs[0].get("steps"), "runs": runs,
            **summarize(runs)}
  with open(os.path.join(FLAGS.out, "parity.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(json.dumps(report, indent=1))


def define_flags() -> None:
  """The command's flags, defined when it runs (not on import: commands' flags would
  collide in one process)."""
  flags.DEFINE_string("config", "configs/alive_clip.py:demo", "A CLIP config.")
  flags.DEFINE_integer("steps", 0, "Training steps (0: the config's total_steps).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed, torch seed).")
  flags.DEFINE_string("out", "/tmp/agriclip_parity",
                      "Workdirs, dumped batches and per-seed results.")
  flags.DEFINE_string("data_dir", "", "TFDS data dir ('': the config's / default).")
  flags.DEFINE_integer(
      "torch_threads", 0, "open_clip's CPU threads (0: torch's default). 1 on a busy machine: "
      "torch's thread pool slows down several times when its cores are shared.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
