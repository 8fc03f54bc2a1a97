"""Config helpers: short config arguments, validation against a trainer's fields, `every`.

A config file is `get_config(arg=None) -> ConfigDict`; `arg` is the text after the colon in
`--config configs/x.py:demo,img=B/16` and is parsed by `parse_arg` into typed options. Each
trainer publishes `default_config()`, which names every field it reads; `validate` rejects
any other field, with its dotted name, before anything is built or compiled.
"""

import ast
import difflib
import hashlib
import json
import os
import re
from typing import Iterable

from absl import flags
import ml_collections

from agriclip_jax import errors


class ConfigError(errors.UserError, ValueError):
  """The config names something that does not exist or is inconsistent."""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"demo,img=B/16" -> ConfigDict(demo=True, img="B/16", ...) typed like `defaults`."""
  options, previous = dict(defaults), None
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      hint = ""
      if not has_value and previous is not None and "=" in previous:
        hint = (f" (it follows {previous!r}: options are split at commas, so a value cannot "
                "hold one; the config's docstring says how to give several, e.g. a+b)")
      raise ConfigError(f"unknown config option {key!r}{_did_you_mean(key, defaults)}; "
                        f"options: {sorted(defaults)}{hint}")
    previous = item
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ConfigError(f"config option {key!r} needs a value ({key}=...)")
      options[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config option {key!r} is a boolean; got {value!r}")
      options[key] = value.lower() in ("true", "1")
    elif default is None or isinstance(default, str):
      options[key] = value
    else:
      try:
        options[key] = type(default)(value)
      except ValueError:
        raise ConfigError(f"config option {key!r} expects {type(default).__name__}; "
                          f"got {value!r}") from None
  return ml_collections.ConfigDict(options)


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
  close = difflib.get_close_matches(name, list(candidates), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def validate(config, reference, open_fields: Iterable[str] = (), prefix: str = "") -> None:
  """Raises ConfigError naming the first field of `config` that `reference` lacks.

  `open_fields` are dotted names whose contents are free-form here (checked by their owner,
  e.g. evaluator configs by the evaluator).
  """
  open_fields = set(open_fields)
  for key in config.keys():
    name = prefix + key
    if key not in reference:
      raise ConfigError(f"unknown config field {name!r}"
                        f"{_did_you_mean(key, reference.keys())}")
    if name in open_fields:
      continue
    value, ref_value = config[key], reference[key]
    if isinstance(value, ml_collections.ConfigDict) and isinstance(
        ref_value, ml_collections.ConfigDict):
      validate(value, ref_value, open_fields, prefix=name + ".")


def check_keys(given, allowed: Iterable[str], where: str) -> None:
  """Unknown keys in a free-form sub-config (e.g. one evaluator's) -> ConfigError."""
  allowed = set(allowed)
  for key in given.keys():
    if key not in allowed:
      raise ConfigError(f"unknown config field '{where}.{key}'"
                        f"{_did_you_mean(key, allowed)}")


def compile_regex(pattern: str, where: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"{where}: invalid regular expression {pattern!r} ({e})") from None


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def every(step: int, period: int | None, total: int | None = None) -> bool:
  """Whether periodic work with this period is due at `step` (always at the last step)."""
  if total is not None and step == total:
    return True
  return bool(period) and step % period == 0


def fingerprint(*parts) -> str:
  """A short stable hash of JSON-able parts (config dicts, paths, steps): a cache key."""
  return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def absolute(path: str) -> str:
  """`path` made absolute (Orbax and TensorStore refuse relative paths); URLs unchanged."""
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def expand_path(path: str | None, workdir: str) -> str | None:
  """Paths in configs may use {workdir} and ~; the result is absolute (unset stays unset)."""
  if not path:
    return path
  return absolute(path.format(workdir=workdir))


def changes(old: dict, new: dict, ignored: Iterable[str] = ()) -> list[str]:
  """["field: old -> new", ...] between two configs as JSON dicts (nested), leaving out the
  dotted names in `ignored` and the fields below them."""

  def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict) and value:
        out.update(flat(value, f"{prefix}{key}."))
      else:
        out[prefix + key] = value
    return out

  old, new = flat(old), flat(new)
  ignored = tuple(ignored)
  show = lambda fields, k: json.dumps(fields[k]) if k in fields else "(unset)"
  return [f"{k}: {show(old, k)} -> {show(new, k)}" for k in sorted(set(old) | set(new))
          if (k in old, old.get(k)) != (k in new, new.get(k))
          and not any(k == i or k.startswith(i + ".") for i in ignored)]


def find_config_file(path: str) -> str:
  """A config file's path: as given if it exists, else relative to the directory that holds
  the `configs` package (configs name each other that way, and an installed package's
  commands find `configs/x.py` from any working directory)."""
  if not os.path.exists(path) and os.path.exists(os.path.join(REPO_ROOT, path)):
    return os.path.join(REPO_ROOT, path)
  return path


def locate_config_arg(argv: list[str]) -> list[str]:
  """Command-line arguments with the `--config` file's path resolved by `find_config_file`."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(("--config=", "-config=")):
      flag, _, spec = arg.partition("=")
      path, colon, rest = spec.partition(":")
      out[i] = f"{flag}={find_config_file(path)}{colon}{rest}"
    elif arg in ("--config", "-config") and i + 1 < len(out):
      path, colon, rest = out[i + 1].partition(":")
      out[i + 1] = f"{find_config_file(path)}{colon}{rest}"
  return out


def load(config_spec: str) -> ml_collections.ConfigDict:
  """"configs/x.py:demo,img=B/16" -> the ConfigDict that file's get_config returns."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = config_spec.partition(":")
  path = find_config_file(path)
  if not os.path.exists(path):
    raise ConfigError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(
      "_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_list(text) -> list:
  """A list field's command-line value, e.g. `[("data", -1), ("fsdp", 2)]`, read as a Python
  literal (a tuple becomes a list, since ConfigDict keeps a field's type)."""
  if isinstance(text, (list, tuple)):  # absl parses the field's default too.
    return list(text)
  try:
    value = ast.literal_eval(text)
  except (SyntaxError, ValueError):
    value = None
  if not isinstance(value, (list, tuple)):
    raise ValueError("expected a Python list literal, quoted for the shell, e.g. "
                     """'[("data", -1), ("fsdp", 2)]'""")
  return list(value)


class ListParser(flags.ArgumentParser):
  """ml_collections' config flags refuse to override list fields (`mesh`, `sharding_rules`,
  `requires`); launch.py registers this parser for them."""

  def parse(self, argument):
    return parse_list(argument)

  def flag_type(self):
    return "list literal"


def check_field(config, dotted_name: str) -> None:
  """ConfigError if `a.b.c` is not a field of `config` (for command-line overrides)."""
  node, walked = config, []
  for key in dotted_name.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      options = node.keys() if isinstance(node, ml_collections.ConfigDict) else []
      raise ConfigError(f"unknown config field {'.'.join(walked + [key])!r}"
                        f"{_did_you_mean(key, options)}")
    node = node[key]
    walked.append(key)
