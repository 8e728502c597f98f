"""The memory protocol a model's per-ubatch forward runs against.

A model never stores memory: its step is the pure function
``logits, mem = forward(model, tokens, pos, valid, mem)``, and ``mem`` is any pytree that
implements :class:`ModelMemory`. The memory has already been *bound* to the ubatch before the step
(it knows which sequence and position every token slot holds: the hybrid memory's placement info,
or :meth:`jaxhybrid.models.DenseMemory.bind`); the model only asks it for what each layer needs.

Dimension names used below:

- ``ubatch`` (``T``): token slots of the ubatch, padded to the static ``n_ubatch``.
- ``sets`` (``S``): seq sets of the ubatch (static; at most ``n_ubatch``). One sequence per set.
- ``kv`` (``C``): key/value cells visible to the ubatch (any static number).
- ``kv_heads`` / ``head_dim``: attention KV heads and their width.
- ``d_conv1``: ``d_conv - 1`` conv taps kept as state; ``d_inner`` / ``d_state``: Mamba widths.

Layer numbering: ``attn_layer`` counts attention layers only (0 for the first attention layer of
the model), ``mamba_layer`` counts Mamba layers only.

Seq sets: ``seq_set[t]`` is the set of token slot ``t`` (-1 for padding). The valid tokens of a set
are contiguous and in position order (as in :class:`jaxhybrid.UBatch`, where set ``i`` is the
block ``[i * n_seq_tokens, (i + 1) * n_seq_tokens)``); padding slots may only sit between or after
sets. A set's recurrent state continues from the state returned by :meth:`ssm_states` and never
mixes with another set's.

Attention split: the memory stores K/V and decides visibility (:meth:`kv`); the model does the
attention math, including the GQA head grouping (query head ``h`` reads KV head
``h // (n_heads // n_kv_heads)``, as transformers' ``repeat_kv``).

Conv-state layout: ``[S, d_conv - 1, d_inner]``, time-major, oldest input first: row ``d_conv - 2``
is the most recent pre-activation conv input (``in_proj``'s first half) of the sequence. (The
transformers cache keeps ``[B, d_inner, d_conv]``; the two hold the same values, transposed and
without transformers' extra oldest column.) SSM-state layout: ``[S, d_inner, d_state]``, float32.
"""

from __future__ import annotations

from typing import Protocol, Self, runtime_checkable

from jaxhybrid.array_typing import Array, Bool, Float, Int

__all__ = ["ModelMemory"]


@runtime_checkable
class ModelMemory(Protocol):
    """What a hybrid model needs from its memory for one ubatch (see the module docstring)."""

    @property
    def seq_set(self) -> Int[Array, " ubatch"]:
        """Seq-set index of every token slot of the bound ubatch, -1 for padding."""
        ...

    def kv(
        self,
        attn_layer: int,
        k: Float[Array, "ubatch kv_heads head_dim"],
        v: Float[Array, "ubatch kv_heads head_dim"],
    ) -> tuple[
        Float[Array, "kv kv_heads head_dim"] | Float[Array, "ubatch kv kv_heads head_dim"],
        Float[Array, "kv kv_heads head_dim"] | Float[Array, "ubatch kv kv_heads head_dim"],
        Bool[Array, "ubatch kv"],
        Self,
    ]:
        """Stores this ubatch's K/V of ``attn_layer`` and returns everything the queries may read.

        Returns:
            ``(k_all, v_all, mask, mem)``: ``mask[t, c]`` is True when token ``t`` may attend to
            cell ``c`` (same sequence, cell position ``<=`` the token's position, this ubatch's own
            K/V included). Padding rows are all False. ``mem`` holds the stored K/V. ``k_all`` /
            ``v_all`` are either shared by every token, ``[kv, ...]``, or per token,
            ``[ubatch, kv, ...]`` (cell ``c`` of token ``t`` is ``k_all[t, c]``; e.g. each token's
            own KV stream); the model handles both.
        """
        ...

    def ssm_states(
        self, mamba_layer: int
    ) -> tuple[Float[Array, "sets d_conv1 d_inner"], Float[Array, "sets d_inner d_state"]]:
        """The state each seq set of the ubatch starts from (zeros for a new sequence and for
        sets that hold no token)."""
        ...

    def set_ssm_states(
        self,
        mamba_layer: int,
        conv: Float[Array, "sets d_conv1 d_inner"],
        ssm: Float[Array, "sets d_inner d_state"],
        *,
        conv_tok: Float[Array, "ubatch d_conv1 d_inner"] | None = None,
        ssm_tok: Float[Array, "ubatch d_inner d_state"] | None = None,
    ) -> Self:
        """Stores the final state of every seq set (sets without tokens get their input back).

        ``conv_tok`` / ``ssm_tok`` are the states after every token slot; a memory that keeps
        rollback snapshots takes them from there, others ignore them."""
        ...
