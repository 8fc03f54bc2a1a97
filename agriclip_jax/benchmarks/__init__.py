"""Benchmarks, printed as JSON (commands, not tests): `train_step` (training throughput and
MFU), `input` (dataset builds and the input pipeline), `aligner` (AgriCLIP alignment fits),
`parity` (against open_clip). Each runs as `python -m agriclip_jax.benchmarks.<name>`."""
