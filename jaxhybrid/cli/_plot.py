"""The picture of the memory after every phase (``--plot FILE``; needs matplotlib)."""

from __future__ import annotations

import numpy as np

from jaxhybrid.cli._report import DemoResult
from jaxhybrid.serving import MemoryUsage

__all__ = ["plot_memory"]


def plot_memory(res: DemoResult, path: str) -> None:
    """Writes a PNG: after every phase (and right after the first context shift), KV cells x
    sequences (colour = position, blank = not held) and recurrent cells x sequences."""
    from matplotlib.figure import Figure

    # The memory after the last phase is empty: leave out empty pictures.
    snaps = [(n, u) for n, u in res.snapshots if u.kv_cells_used or u.recurrent_cells_used]
    snaps = snaps or res.snapshots
    fig = Figure(figsize=(11, 1.1 + 1.0 * len(snaps)), layout="constrained")
    axes = fig.subplots(len(snaps), 2, squeeze=False, width_ratios=[5, 1])
    vmax = max(1, max(int(u.kv_pos.max()) for _, u in snaps))
    image = None
    for (name, u), (ax_kv, ax_rs) in zip(snaps, axes, strict=True):
        image = _draw_kv(ax_kv, u, vmax)
        ax_kv.set_ylabel(name, rotation=0, ha="right", va="center")
        _draw_recurrent(ax_rs, u, vmax)
    axes[0, 0].set_title("KV cells (colour: position)", fontsize=9)
    axes[0, 1].set_title("recurrent cells", fontsize=9)
    axes[-1, 0].set_xlabel("cell")
    axes[-1, 1].set_xlabel("cell")
    fig.colorbar(image, ax=axes[:, 1], label="position", shrink=0.6)
    fig.savefig(path, dpi=90)


def _draw_kv(ax, u: MemoryUsage, vmax: int):
    """KV cells x sequences, streams side by side (split by vertical lines)."""
    n_seq = u.kv_seq.shape[-1]
    held = u.kv_seq.reshape(-1, n_seq).T  # [seq, stream * cell]
    pos = np.broadcast_to(u.kv_pos.reshape(1, -1), held.shape)
    grid = np.where(held, pos, np.nan)
    image = ax.imshow(
        grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=vmax
    )
    ax.set_yticks(range(n_seq), [f"s{s}" for s in range(n_seq)], fontsize=7)
    n_cells = held.shape[1]
    if u.kv_pos.shape[0] > 1:
        for b in range(1, u.kv_pos.shape[0]):
            ax.axvline(b * u.kv_pos.shape[1] - 0.5, color="k", lw=0.5)
    ax.set_xlim(-0.5, n_cells - 0.5)
    ax.tick_params(labelsize=7)
    return image


def _draw_recurrent(ax, u: MemoryUsage, vmax: int) -> None:
    """Recurrent cells x sequences (colour = the state's position)."""
    n_seq = u.recurrent_seq.shape[-1]
    grid = np.where(u.recurrent_seq.T, u.recurrent_pos[None, :], np.nan)  # [seq, cell]
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=vmax)
    ax.set_yticks(range(n_seq), [f"s{s}" for s in range(n_seq)], fontsize=7)
    ax.set_xticks(range(grid.shape[1]))
    ax.tick_params(labelsize=7)
