"""End-of-run PNG: loss (train, validation, MTP, indexer KL), learning rate and expert balance."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_metrics", "plot_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict]:
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return out


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [r for r in recs if r.get("kind") == "train"]
    val = [r for r in recs if r.get("kind") == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    if train:
        steps = [r["step"] for r in train]
        if any(r.get("ce") is not None for r in train):
            ax.plot(steps, [r.get("ce") for r in train], lw=0.8, label="train CE")
        if any(r.get("mtp") is not None for r in train):
            ax.plot(steps, [r.get("mtp") for r in train], lw=0.8, alpha=0.7, label="train MTP CE")
        if any(r.get("indexer_kl") is not None for r in train):
            ax.plot(steps, [r.get("indexer_kl") for r in train], lw=0.8, label="indexer KL")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="val CE")
        if "unigram_baseline" in val[-1]:
            ax.axhline(val[-1]["unigram_baseline"], ls="--", c="gray", lw=0.8, label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title("loss")
    ax.legend(fontsize=8)
    ax = axes[1]
    if train:
        ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set_xlabel("step")
    ax.set_title("learning rate")
    ax = axes[2]
    bal = [r for r in train if r.get("balance")]
    if bal:
        layers = sorted({k for r in bal for k in r["balance"].get("layers", {})}, key=int)
        for k in layers:
            ax.plot([r["step"] for r in bal], [r["balance"]["layers"].get(k) for r in bal], lw=0.6, alpha=0.6,
                    label=f"layer {k}")
        ax.plot([r["step"] for r in bal], [r["balance"]["max_vio"] for r in bal], c="k", lw=1.5, label="mean")
        ax.legend(fontsize=6, ncol=2)
    ax.set_xlabel("step")
    ax.set_title("expert imbalance: (max load − mean) / mean")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
