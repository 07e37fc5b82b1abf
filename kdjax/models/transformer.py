"""A causal (decoder-only) byte-level transformer language model, in Flax Linen.

Pre-LayerNorm blocks (GPT-2 style): ``x + attn(LN(x))`` with a causal mask, then
``x + MLP(LN(x))`` (GELU, ``mlp_ratio`` x width); learned absolute position embeddings, a final
LayerNorm and an untied output head. ``CausalLM(...).apply(variables, tokens)`` maps int tokens
(B, T) to next-token logits (B, T, vocab): position t sees tokens 0..t only. Used by
`kdjax.lm` (``python -m experiments.lm``) for teacher and student.

With ``decode=True`` the model reads one token per call (B, 1) and keeps the keys and values of
the earlier ones in the mutable ``cache`` collection (Flax's autoregressive attention cache),
so sampling T tokens costs T single-position forwards. `init_cache` makes that cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Block(nn.Module):
    width: int
    heads: int
    mlp_ratio: int = 4

    decode: bool = False

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.width, decode=self.decode,
                                                name="attn")(h, h, mask=mask)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.Dense(self.mlp_ratio * self.width, name="fc1")(h)
        return x + nn.Dense(self.width, name="fc2")(nn.gelu(h))


class CausalLM(nn.Module):
    """Next-token logits of a causal transformer: (B, T) int tokens -> (B, T, vocab) float32."""

    vocab: int = 256
    width: int = 128
    depth: int = 4
    heads: int = 4
    max_len: int = 256
    decode: bool = False

    @nn.compact
    def __call__(self, tokens):
        t = tokens.shape[-1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds the model's max_len={self.max_len}")
        x = nn.Embed(self.vocab, self.width, name="embed")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.width))
        if self.decode and self.has_variable("cache", "position"):  # one token, at the cache's position
            index = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            x = x + jax.lax.dynamic_slice_in_dim(pos, index.value, 1)
            index.value = index.value + 1
            mask = None  # the attention cache masks the positions not yet written
        else:
            if self.decode:  # initialising the cache: the full length, nothing written yet
                self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            x = x + pos[:t]
            mask = nn.make_causal_mask(tokens)
        for i in range(self.depth):
            x = Block(self.width, self.heads, decode=self.decode, name=f"block{i}")(x, mask)
        x = nn.LayerNorm(name="ln_f")(x)
        return nn.Dense(self.vocab, name="head")(x).astype(jnp.float32)


def init_cache(model: CausalLM, batch: int):
    """An empty attention cache of `model` (``decode=True``) for `batch` sequences of max_len."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, model.max_len), jnp.int32)))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
