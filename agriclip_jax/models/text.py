"""Text transformer tower: CLIP form (causal, pooled at the end-of-text token) by default,
SigLIP form with `causal=False, mask_padding=False, pool_type="last"`.

Tokens follow `input/tokenizer.py`: id 0 is padding and the end-of-text token is the last
non-zero token of each row (a SigLIP tokenizer pads with its own id, which this form attends
to, as SigLIP was trained).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from agriclip_jax.models import layers

def eot_index(tokens):
  """Position of the last non-padding token of each row (the end-of-text token)."""
  length = tokens.shape[-1]
  return length - 1 - jnp.argmax((tokens != 0)[:, ::-1], axis=-1)


class Model(nn.Module):
  """Returns (pooled output, dict of intermediate outputs)."""
  vocab_size: int = 32_000
  width: int = 512
  depth: int = 12
  mlp_dim: int = 2048
  num_heads: int = 8
  causal: bool = True
  pool_type: str = "eot"  # eot | first | last | gap | map
  num_classes: int | None = None  # A linear head to this width ("head"), if set.
  activation: str = "gelu"
  dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  remat: bool | str = False  # See layers.REMAT_POLICIES.
  scan: bool = False  # The blocks as one lax.scan (see layers.Encoder).
  dtype: Any = jnp.float32
  mask_padding: bool = True  # Bidirectional towers: padding is not attended to.
  head_bias: bool = True

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    out = {}
    n, length = tokens.shape
    x = nn.Embed(self.vocab_size, self.width, name="embedding",
                 embedding_init=nn.initializers.normal(stddev=0.02))(tokens)
    # 0.01 as in CLIP: a larger position embedding (e.g. 1/sqrt(width)) swamps the 0.02 token
    # embeddings at the start of training and costs up to 30 points of zero-shot accuracy.
    posemb = self.param("pos_embedding", nn.initializers.normal(stddev=0.01),
                        (1, length, self.width), jnp.float32)
    x = (x + posemb).astype(self.dtype)
    end = eot_index(tokens)
    # Valid positions are those up to and including the end-of-text token.
    valid = jnp.arange(length)[None, :] <= end[:, None]  # [n, length]
    if self.causal:
      mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    elif self.mask_padding:
      mask = valid[:, None, None, :]
    else:
      mask = None
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = layers.Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation,
                       self.dropout, self.layer_norm_eps, self.remat, self.dtype,
                       scan=self.scan, name="encoder")(x, mask=mask, train=train)
    out["encoded"] = x
    if self.pool_type == "eot":
      x = layers.pool(x, "index", index=end)
    elif self.pool_type == "first":
      x = layers.pool(x, "tok")
    elif self.pool_type == "last":
      x = x[:, -1]
    else:
      map_head = (layers.MAPHead(self.num_heads, self.mlp_dim, self.layer_norm_eps,
                                 self.dtype, self.activation, name="map_head")
                  if self.pool_type == "map" else None)
      x = layers.pool(x, self.pool_type, mask=valid if self.mask_padding else None,
                      map_head=map_head)
    out["pre_logits"] = x
    if self.num_classes:
      x = nn.Dense(self.num_classes, use_bias=self.head_bias, dtype=self.dtype, name="head")(x)
    out["logits"] = x
    return x, out
