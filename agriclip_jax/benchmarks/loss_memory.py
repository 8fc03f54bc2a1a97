"""Memory of the plain and the chunked contrastive loss at large global batches, printed as JSON:

  python -m agriclip_jax.benchmarks.loss_memory [--devices=256] [--batches=4096,32768]
      [--chunk=1024] [--losses=softmax,sigmoid] [--config=configs/alive_clip.py]

For each loss and global batch, compiles the config's loss and its gradient alone (as the
planner does: `plan.Planner.loss_temp_bytes`, metrics included) on the embeddings of that
batch over N simulated devices, plain (`loss_chunk_size=0`) and chunked, and reports XLA's
per-device temporaries. These are XLA CPU figures: estimates for GPUs and TPUs.
"""

import json
import sys

from agriclip_jax import plan


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_integer("devices", 256, "Simulated devices.")
  flags.DEFINE_list("batches", ["4096", "32768"], "Global batch sizes.")
  flags.DEFINE_integer("chunk", 1024, "loss_chunk_size of the chunked form.")
  flags.DEFINE_list("losses", ["softmax", "sigmoid"], "Losses.")
  flags.DEFINE_string("config", "configs/alive_clip.py", "The config whose model and loss "
                      "settings are used.")
  flags.FLAGS(argv)
  from agriclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  args = flags.FLAGS
  if jax.device_count() != args.devices:
    raise SystemExit(f"error: asked for {args.devices} devices, JAX has {jax.device_count()}")
  results = {"devices": args.devices, "config": args.config, "chunk": args.chunk, "rows": [],
             "note": plan.CPU_NOTE}
  for loss in args.losses:
    for batch in (int(b) for b in args.batches):
      row = {"loss": loss, "global_batch": batch}
      for chunk in (0, args.chunk):
        config = config_lib.load(args.config)
        config.loss, config.loss_chunk_size, config.input.batch_size = loss, chunk, batch
        if loss == "sigmoid":
          config.model.logit_bias_init = -10.0
        mib = plan.Planner(config).loss_temp_bytes(batch) / 2**20
        row["chunked_mib" if chunk else "plain_mib"] = round(mib, 1)
      row["ratio"] = round(row["plain_mib"] / row["chunked_mib"], 1)
      results["rows"].append(row)
      print(json.dumps(row), file=sys.stderr)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  # The flag's default unless given: XLA must know before JAX starts.
  plan.simulate_devices(sys.argv if any(a.startswith("--devices") for a in sys.argv)
                        else sys.argv + ["--devices=256"])
  main(sys.argv)
