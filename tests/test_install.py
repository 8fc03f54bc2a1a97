"""The package as installed (`pip install -e ".[test]"`, the README's command): its commands
exist and work from any working directory, finding `configs/` and the `data/` builders."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)
COMMANDS = ("launch", "prepare", "predict", "embed", "export", "inspect", "benchmark", "plan")


@pytest.fixture(scope="module")
def distribution():
  try:
    return importlib.metadata.distribution("agriclip-jax")
  except importlib.metadata.PackageNotFoundError:
    pytest.fail('agriclip_jax is not installed in this environment: pip install -e ".[test]" '
                "(the README's test command does)")


def _run(command, cwd, *args):
  return subprocess.run([os.path.join(BIN, command), *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300, check=False)


def test_console_commands_are_installed(distribution):
  scripts = {e.name: e for e in distribution.entry_points if e.group == "console_scripts"}
  assert set(scripts) == {f"agriclip-{c}" for c in COMMANDS}
  for entry in scripts.values():
    assert callable(entry.load()), entry  # Each names a function that exists.
  for command in COMMANDS:
    assert os.access(os.path.join(BIN, f"agriclip-{command}"), os.X_OK), command
  requires = distribution.requires
  assert "jax==0.10.2" in requires and any(r.startswith("torch==") and "extra ==" in r
                                           for r in requires)


def test_commands_find_configs_and_builders_from_another_directory(distribution, tmp_path):
  """From a directory that holds neither `configs/` nor `data/`: the launcher reads
  `configs/alive_clip.py` (a misspelt field is then named: the config was loaded), the
  builders import, and inspect answers in one line."""
  result = _run("agriclip-launch", tmp_path, "--config", "configs/alive_clip.py:demo",
                f"--workdir={tmp_path / 'run'}", "--config.total_stepz=3")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: unknown config field 'total_stepz' (did you mean 'total_steps'?)"], result.stderr
  code = ("import configs.alive_lit, data.agri_synthetic, tensorflow_datasets as tfds; "
          "print(tfds.builder_cls('agri_synthetic').__module__)")
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split()[-1].startswith("data.agri_synthetic"), result.stdout
  result = _run("agriclip-inspect", tmp_path, str(tmp_path / "missing"))
  assert result.returncode == 2
  assert result.stderr.strip() == f"error: {tmp_path / 'missing'}: no such file or directory"
