"""Benchmarks, printed as JSON (commands, not tests): `train_step` (training throughput and
MFU), `input` (dataset builds and the input pipeline), `aligner` (AgriCLIP alignment fits),
`parity` (against open_clip), `lit_cache` (LiT from cached image features against plain LiT),
`loss_memory` (plain against chunked contrastive losses at large batches). Each runs as
`python -m agriclip_jax.benchmarks.<name>`."""
