"""Prepares a dataset from the user's raw files:

  python -m agriclip_jax.input.prepare alive --manual_dir=/data/ALive [--data_dir=DIR]
  python -m agriclip_jax.input.prepare inaturalist2021_text --manual_dir=/data/inat2021
  python -m agriclip_jax.input.prepare agri_downstream/cow_breed --manual_dir=/data/cows
  python -m agriclip_jax.input.prepare alive --manual_dir=... --option caption_column=text

`--option key=value` sets a field of the builder's config (see each builder's docstring). TFDS
keys a prepared dataset by config name, so options build a config of their own, named
`<config>_<hash of the options>` unless `--config_name` says otherwise; the command prints
the name to train on (`--config.input.dataset=alive/default_3f2a9c1b`). Shows progress,
then what was kept and skipped (listed in build_report.json beside the data). The same build
runs with TFDS's own CLI: `tfds build data/alive --manual_dir=... --data_dir=...`.
"""

import dataclasses
import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging

from agriclip_jax import files  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def typed_options(config, options: list[str]) -> dict:
  """["key=value", ...] -> fields of the dataclass `config`, converted to their types."""
  fields = {f.name: f for f in dataclasses.fields(config)}
  out = {}
  for option in options:
    key, _, value = option.partition("=")
    if key not in fields or key in ("name", "version", "description"):
      allowed = sorted(set(fields) - {"name", "version", "description", "release_notes",
                                      "supported_versions", "tags"})
      raise ValueError(f"unknown builder option {key!r}; options: {allowed}")
    current = getattr(config, key)
    if isinstance(current, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(current, (int, float)):
      out[key] = type(current)(value)
    else:
      out[key] = value
  return out


def prepare(name: str, manual_dir: str, data_dir: str | None = None,
            options: list[str] = (), force: bool = False, config_name: str = ""):
  """Builds `name` from `manual_dir`; returns the builder and its build report (or None)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from agriclip_jax.input import datasets  # pylint: disable=g-import-not-at-top
  data_dir = datasets.default_data_dir(data_dir)
  builder = datasets.builder(name, data_dir, prepare=False, must_exist=False)
  if options:
    fields = typed_options(builder.builder_config, options)
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    config = dataclasses.replace(
        builder.builder_config, name=config_name or f"{builder.builder_config.name}_{digest}",
        **fields)
    builder = type(builder)(config=config, data_dir=data_dir)
  if builder.is_prepared() and not force:
    logging.info("%s is already prepared in %s (--force rebuilds it)", name, builder.data_dir)
  else:
    if not os.path.isdir(manual_dir):
      raise datasets.DatasetError(f"--manual_dir {manual_dir} is not a directory")
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if force else
            tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    if force and builder.is_prepared():
      mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    with datasets.file_lock(files.join(data_dir, f".{builder.name}.lock")):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir, download_mode=mode))
  report_path = files.path(builder.data_dir) / "build_report.json"
  return builder, files.read_json(report_path) if report_path.exists() else None


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m agriclip_jax.input.prepare DATASET --manual_dir=DIR")
  if not FLAGS.manual_dir:
    raise app.UsageError("--manual_dir is required")
  from agriclip_jax import errors  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  try:
    builder, report = prepare(argv[1], os.path.expanduser(FLAGS.manual_dir), FLAGS.data_dir,
                              FLAGS.option, FLAGS.force, FLAGS.config_name)
  except (ValueError, *errors.USER_ERRORS) as e:  # Builders' InputError is a ValueError.
    print(f"error: {e}", file=sys.stderr)
    return 2
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"{builder.info.full_name}: {sizes} in {builder.data_dir}")
  if report:
    for reason, entry in report["skipped"].items():
      print(f"skipped {entry['count']} ({reason}), e.g. {entry['items'][0]['item']}")
  return 0


def define_flags() -> None:
  """The command's flags, defined when it runs (not on import: commands' flags would
  collide in one process)."""
  flags.DEFINE_string("manual_dir", None, "The raw files.")
  flags.DEFINE_string("data_dir", None,
                      "TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).")
  flags.DEFINE_multi_string("option", [], "key=value builder config field.")
  flags.DEFINE_string("config_name", "",
                      "Name of the builder config --option values make (default: "
                      "the base config's name and a hash of the options).")
  flags.DEFINE_bool("force", False, "Rebuild even if already prepared.")


def run() -> None:
  """The command (`agriclip-prepare` where the package is installed)."""
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
