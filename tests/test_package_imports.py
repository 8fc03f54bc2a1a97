"""Every module of the package imports in one process: the way pytest collects the tests."""

import subprocess
import sys

_IMPORT_ALL = """
import importlib, pkgutil
import agriclip_jax
names = [m.name for m in pkgutil.walk_packages(agriclip_jax.__path__, "agriclip_jax.")]
for name in names:
  importlib.import_module(name)
print(len(names))
"""


def test_all_modules_import_together():
  # Commands that define absl flags on import collide ("flag 'data_dir' is defined twice")
  # as soon as a test imports two of them; a fresh process sees what one test run would.
  result = subprocess.run([sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert int(result.stdout.split()[-1]) > 50
