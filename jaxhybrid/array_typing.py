"""Array-shape aliases used in signatures and record fields.

Dimension legend (names used inside the jaxtyping strings):

- ``batch``: token slots of a padded batch (static capacity ``n_batch``).
- ``ubatch``: token slots of one ubatch (static capacity ``n_ubatch``).
- ``ubatches``: the static upper bound on the number of ubatches of a plan.
- ``seq_ids``: the seq-id slots per token (static ``n_seq_id_max``), ordered, first = primary.
- ``seqs``: sequence ids ``[0, n_seq_max)``.
- ``streams``: KV streams (1 when unified, else ``n_seq_max``).
- ``cells``: KV cells of one stream (``kv_size``).
- ``rs``: recurrent cells (``rs_size = max(1, n_seq_max)``).
- ``layers``: layers served by one part of the memory.
- ``heads`` / ``head_dim``: KV heads and their width.
- ``embd``: input embedding width.
"""

from __future__ import annotations

from jaxtyping import Array, Bool, Float, Int, Shaped

__all__ = ["Array", "Bool", "Float", "Int", "Scalar", "ScalarBool", "Shaped"]

Scalar = Int[Array, ""]
ScalarBool = Bool[Array, ""]
