"""Train state: created sharded, resumed from the workdir, or initialised from another run.

The state is a dict `{step, params, opt_state, rng}`; `opt_state` covers only the trainable
parameters (see `optim.split`). `rng` holds raw uint32 key data so checkpoints stay plain.
"""

import dataclasses
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from agriclip_jax import checkpointing
from agriclip_jax import config_lib
from agriclip_jax import files
from agriclip_jax import optim
from agriclip_jax import sharding
from agriclip_jax.models import importers
from agriclip_jax.pytree import flatten, unflatten


@dataclasses.dataclass
class StateSpec:
  init: Callable[[], Any]  # () -> state, jitted with out_shardings
  shardings: Any
  abstract: Any  # ShapeDtypeStructs with shardings (restore target)
  labels: dict[str, str]  # parameter path -> optimizer group or "frozen"
  eval_key: str = "params"  # The state entry evaluators use (DINO: "teacher").
  # state -> state with the `extra_state` entries rebuilt from its params (after config.init
  # replaced them, a DINO teacher must start from the loaded weights, not the random ones).
  refresh: Callable[[Any], Any] | None = None


def make_spec(model_init: Callable[[jax.Array], Any], tx, labels, mesh, rules, seed: int,
              fsdp_min_size: int = 2**14,
              extra_state: Callable[[Any], dict[str, Any]] | None = None,
              eval_key: str = "params") -> StateSpec:
  """`model_init(rng) -> params`; `tx` works on the trainable sub-tree given by `labels`.

  `extra_state(params)` adds entries (a DINO teacher, its center): each leaf is sharded like
  the parameter whose path it ends with, else like a large fsdp array or replicated.
  """

  def init():
    rng = jax.random.key(seed)
    params = model_init(jax.random.fold_in(rng, 0))
    trainable, _ = optim.split(params, labels)
    # Training draws fold_in(state rng, step): a stream apart from the initialisation's.
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init(trainable),
             "rng": jax.random.key_data(jax.random.fold_in(rng, 1))}
    state.update(extra_state(params) if extra_state else {})
    return state

  shape = jax.eval_shape(init)
  params_sharding = sharding.param_shardings(mesh, shape["params"], rules, fsdp_min_size)
  shardings = {key: sharding.follow_params(mesh, value, shape["params"], params_sharding,
                                           fsdp_min_size)
               for key, value in shape.items() if key not in ("step", "rng", "params")}
  shardings.update(step=sharding.replicated(mesh), rng=sharding.replicated(mesh),
                   params=params_sharding)
  refresh = None
  if extra_state:
    refresh = jax.jit(lambda state: {**state, **extra_state(state["params"])},
                      out_shardings=shardings)
  return StateSpec(jax.jit(init, out_shardings=shardings), shardings,
                   checkpointing.abstract(shape, shardings), labels, eval_key, refresh)


def latest_step(directory: str) -> int | None:
  """The newest step in `directory` whose checkpoint has every file its manifest lists, at
  its size; a damaged one is skipped here (a resuming run moves it aside), so loaders never
  read it. Checksums are left to the restore: this is called several times at start-up.

  This is the question "which checkpoint can be read" for every reader; only a training run,
  while it saves, asks its Orbax manager (`checkpointing.Checkpoints.latest_step`), which also
  knows of a save still being written."""
  return next((step for step in _steps(directory, with_state=True)
               if checkpointing.damage(files.join(directory, str(step)),
                                       checksums=False) is None), None)


def _steps(directory: str, with_state: bool) -> list[int]:
  """The step directories in `directory`, newest first (those holding a state only, if
  `with_state`); none where `directory` is missing."""
  directory = files.path(directory)
  if not directory.is_dir():
    return []
  return sorted((int(d.name) for d in directory.iterdir() if d.name.isdigit()
                 and (not with_state or (d / "state").is_dir())), reverse=True)


def load_params(init_config, state, spec: StateSpec, workdir: str):
  """(state with parameters from another run's latest checkpoint, the paths copied).

  `init_config.workdir` is the other run's workdir; `params` / `skip` are regexes over
  parameter paths that select what is copied. Every selected parameter must exist in this
  model with the same shape.
  """
  path, _ = _latest_state(config_lib.expand_path(init_config.workdir, workdir),
                          where="config.init.workdir ")
  stored = flatten(ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree["params"])
  select = config_lib.compile_regex(init_config.get("params") or ".*", "config.init.params")
  skip = (config_lib.compile_regex(init_config.skip, "config.init.skip")
          if init_config.get("skip") else None)
  chosen = [k for k in stored if select.fullmatch(k) and not (skip and skip.fullmatch(k))]
  target = flatten(spec.abstract["params"])
  problems = [f"{k} is not in this model" for k in chosen if k not in target]
  problems += [f"{k}: {tuple(stored[k].shape)} in {path} vs {target[k].shape} here"
               for k in chosen if k in target and tuple(stored[k].shape) != target[k].shape]
  if problems:
    raise checkpointing.mismatch(f"cannot initialise from {path}", problems)
  if not chosen:
    raise config_lib.ConfigError(f"config.init selects no parameters of {path}")
  loaded = flatten(restore(path, {"params": unflatten({k: target[k] for k in chosen})})["params"])
  logging.info("Initialised %d of %d parameter arrays from %s", len(loaded), len(target), path)
  return {**state, "params": unflatten({**flatten(state["params"]), **loaded})}, set(loaded)


# config.init entries naming pretrained checkpoints -> the parameter paths each may fill.
PRETRAINED_SOURCES = (("model", ""), ("img", "img/"), ("txt", "txt/"))


def load_pretrained(init_config, state, spec: StateSpec, model_config=None):
  """(state with parameters from the checkpoints `config.init.{model,img,txt}` name, the paths
  loaded). Every checkpoint is converted (models/importers), checked against this model's
  tower options (`model_config`) and shapes (one line naming the first misfit) and placed with
  the parameters' shardings. `init.img.classifier` also loads a classifier (or DINO) head.
  Parameters of a filled tower that the checkpoint lacks stop the run unless
  `config.init.skip` or `config.init.allow_random` matches them."""
  target = flatten(spec.abstract["params"])
  skip = (config_lib.compile_regex(init_config.skip, "config.init.skip")
          if init_config.get("skip") else None)
  allow = (config_lib.compile_regex(init_config.allow_random, "config.init.allow_random")
           if init_config.get("allow_random") else None)
  loaded = {}
  for name, prefix in PRETRAINED_SOURCES:
    source = init_config.get(name) or {}
    if not source.get("path"):
      continue
    where = f"config.init.{name}"
    checkpoint = importers.read(source["path"], source.get("format") or None)
    towers = [k for k in ("img", "txt") if k in checkpoint.model]
    if prefix and prefix[:-1] not in towers:
      raise config_lib.ConfigError(
          f"{where}: {checkpoint.path} ({checkpoint.format}) holds no "
          f"{'image' if name == 'img' else 'text'} tower, only {' and '.join(towers)}")
    importers.check_architecture(checkpoint, model_config,
                                 ("img", "txt") if name == "model" else (name,), where)
    prefixes = (prefix, "head/") if source.get("classifier") else (prefix,)
    keep = lambda k, p=prefixes: k.startswith(p) and not (skip and skip.fullmatch(k))
    arrays = importers.common.fit(checkpoint, target, keep, where,
                                  optional=bool(source.get("classifier")))
    missing = [k for k in target if keep(k) and k not in arrays
               and not (allow and allow.fullmatch(k))]
    if missing:
      raise config_lib.ConfigError(
          f"{where}: {len(missing)} parameters of this model are not in {checkpoint.path} and "
          f"would stay random: {', '.join(f'{k} {tuple(target[k].shape)}' for k in missing[:4])}"
          f"{' ...' if len(missing) > 4 else ''}; "
          "allow them with config.init.allow_random (a regex) or config.init.skip")
    logging.info("%s: %d parameter arrays from %s (%s)", where, len(arrays), checkpoint.path,
                 checkpoint.format)
    loaded.update(arrays)
  if not loaded:
    return state, set()
  shardings = flatten(spec.shardings["params"])
  placed = {k: jax.make_array_from_callback(v.shape, shardings[k], lambda i, v=v: v[i])
            for k, v in loaded.items()}
  params = unflatten({**flatten(state["params"]), **placed})
  return {**state, "params": params}, set(loaded)


def run_config(workdir: str):
  """The config another run saved as `config.json` in its workdir."""
  path = files.path(workdir) / "config.json"
  if not path.exists():
    raise config_lib.ConfigError(f"{workdir} holds no config.json: is it a training run's "
                                 "workdir?")
  return ml_collections.ConfigDict(files.read_json(path))


def restore(path: str, item):
  """The arrays of `item`, a part of the state stored at `path` (ShapeDtypeStructs with
  shardings), read and placed: the one partial restore of another run's checkpoint."""
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), item)
  return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))


def _latest_state(workdir: str, step: int | None = None,
                  where: str = "") -> tuple[str, int]:
  """(state path, step) of the run's latest intact checkpoint, or of checkpoint `step`;
  `where` prefixes the error (the config field that named the run)."""
  directory = files.join(config_lib.absolute(workdir), "checkpoints")
  if step is not None:
    path = files.join(directory, str(step))
    if not (files.path(path) / "state").is_dir():
      kept = sorted(_steps(directory, with_state=False))
      raise config_lib.ConfigError(f"{workdir} has no checkpoint at step {step} (it keeps "
                                   f"{kept or 'none'})")
    problem = checkpointing.damage(path)
    if problem:
      raise config_lib.ConfigError(f"checkpoint {path} is damaged ({problem})")
    return files.join(path, "state"), step
  step = latest_step(directory)
  if step is None:
    raise config_lib.ConfigError(f"{where}{workdir} has no checkpoint")
  return files.join(directory, str(step), "state"), step


def checkpoint_shapes(workdir: str, entry: str, step: int | None = None):
  """(ShapeDtypeStructs of one entry of a run's latest checkpoint (or `step`'s), its step)."""
  path, step = _latest_state(workdir, step)
  stored = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  if entry not in stored:
    raise config_lib.ConfigError(f"{path} has no {entry!r} (it has {sorted(stored)})")
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                      stored[entry]), step


def load_entry(workdir: str, entry: str, shardings,
               step: int | None = None) -> tuple[Any, int]:
  """(one entry of a run's latest checkpoint (or `step`'s), e.g. "params" or "teacher", its
  step), placed with `shardings`: one sharding for every array, or a tree of them like the
  entry's."""
  shapes, step = checkpoint_shapes(workdir, entry, step)
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, shapes)
  item = {entry: jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              shapes, shardings)}
  return restore(_latest_state(workdir, step)[0], item)[entry], step
