"""Finding, preparing and opening the TFDS datasets the project's builders in `data/` make.

A dataset is named like TFDS names it: `agri_synthetic`, `agri_synthetic/small`,
`alive:1.0.0`. Importing `data.<name>` registers the builder. Builders that need no input
(the synthetic one) are built on first use, under a file lock so that several processes can ask
at once; builders that need files the user has (ALive, iNaturalist) stop with one line that
says how to prepare them.
"""

import contextlib
import fcntl
import importlib
import os
import re
import time

from absl import logging
import tensorflow_datasets as tfds

from agriclip_jax import errors
from agriclip_jax import files


class DatasetError(errors.UserError, RuntimeError):
  """A dataset is missing, unknown or unusable; the message says what to do."""


def default_data_dir(data_dir: str | None = None) -> str:
  return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR")
                            or "~/tensorflow_datasets")


def _register(name: str) -> None:
  package = name.split("/")[0].split(":")[0]
  try:
    importlib.import_module(f"data.{package}")
  except ModuleNotFoundError as e:
    if e.name not in (f"data.{package}", "data"):
      raise
    # Not one of ours: it may still be a TFDS catalogue dataset already in data_dir.


@contextlib.contextmanager
def file_lock(path: str):
  """An exclusive flock on `path`; none on object stores (gs://), which have no locks."""
  if not files.is_local(path):
    logging.warning("%s: no lock on an object store; build datasets there from one process",
                    path)
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def building(name: str):
  """Runs a dataset build, reporting the builders' input errors as `DatasetError`."""
  from data import builder_utils  # pylint: disable=g-import-not-at-top
  try:
    yield
  except builder_utils.InputError as e:
    raise DatasetError(f"{name}: {e}") from None


def builder(name: str, data_dir: str | None = None, prepare: bool = True,
            must_exist: bool = True):
  """The TFDS builder for `name`, built first if it can be built without user files.

  `prepare=False` never builds; `must_exist=False` returns an unprepared builder instead of
  raising (for the prepare command).
  """
  data_dir = default_data_dir(data_dir)
  _register(name)
  try:
    b = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(f"unknown dataset {name!r}: no builder in data/ and none in TFDS "
                       f"({str(e).splitlines()[0]})") from None
  if b.is_prepared() or not must_exist:
    return b
  if not prepare:
    raise DatasetError(f"dataset {name!r} is not prepared in {data_dir}")
  if getattr(b, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    raise DatasetError(
        f"dataset {name!r} is not prepared in {data_dir}. Prepare it from your copy of the "
        f"raw files with: python -m agriclip_jax.input.prepare {name} --manual_dir=RAW_DIR "
        f"--data_dir={data_dir} (or: tfds build data/{name.split('/')[0].split(':')[0]} "
        f"--manual_dir=RAW_DIR --data_dir={data_dir})")
  with file_lock(files.join(data_dir, f".{b.name}.lock")):
    b = tfds.builder(name, data_dir=data_dir)  # Another process may have built it meanwhile.
    if not b.is_prepared():
      logging.info("Building dataset %s into %s (once) ...", name, data_dir)
      start = time.time()
      with building(name):
        b.download_and_prepare(file_format="array_record")
      logging.info("Built %s in %.1fs.", name, time.time() - start)
  return b


def data_source(b, split: str):
  """Random-access source of one split; images stay encoded (the pipeline decodes them)."""
  if split not in b.info.splits:
    raise DatasetError(f"dataset {b.info.full_name} has no split {split!r}; it has "
                       f"{sorted(b.info.splits)}")
  if not b.info.splits[split].num_examples:
    raise DatasetError(f"split {split!r} of {b.info.full_name} is empty")
  image_features = [k for k, f in b.info.features.items()
                    if isinstance(f, tfds.features.Image)]
  return b.as_data_source(split=split, decoders={
      k: tfds.decode.SkipDecoding() for k in image_features})



def class_ids(spec: str, names: list[str], where: str) -> list[int]:
  """Label ids from "name,name,..." or "0-19,25" (ids, ranges inclusive), in that order."""
  items = [s.strip() for s in str(spec).split(",") if s.strip()]
  if not items:
    raise DatasetError(f"{where}: names no class")
  if all(re.fullmatch(r"\d+(-\d+)?", s) for s in items):
    ids = []
    for item in items:
      first, _, last = item.partition("-")
      ids += range(int(first), int(last or first) + 1)
    bad = [i for i in ids if i >= len(names)]
    if bad:
      raise DatasetError(f"{where}: label ids {bad[:5]} are out of range (the dataset has "
                         f"{len(names)} classes)")
    return ids
  unknown = [n for n in items if n not in names]
  if unknown:
    raise DatasetError(f"{where}: unknown classes {unknown[:5]} (e.g. {names[:3]}, or label "
                       "ids such as 0-19)")
  return [names.index(n) for n in items]


class Subset:
  """The examples of a random-access source at `indices`, as a random-access source."""

  def __init__(self, source, indices):
    self._source, self.indices = source, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self._source[self.indices[index]]


def of_classes(source, label_key: str, ids, where: str) -> Subset:
  """The examples of `source` whose `label_key` is one of `ids` (every label is read once)."""
  wanted = set(int(i) for i in ids)
  indices = [i for i in range(len(source)) if int(source[i][label_key]) in wanted]
  if not indices:
    raise DatasetError(f"{where}: no example has one of the {len(wanted)} classes")
  logging.info("%s: %d of %d examples are of the %d chosen classes", where, len(indices),
               len(source), len(wanted))
  return Subset(source, indices)
