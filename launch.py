"""Runs a config: `python launch.py --config configs/alive_lit.py:demo --workdir DIR`.

The command lives in `agriclip_jax/launch.py` (installed as `agriclip-launch`); see its
docstring for overrides and multi-process runs.
"""

from agriclip_jax import launch

if __name__ == "__main__":
  launch.run()
