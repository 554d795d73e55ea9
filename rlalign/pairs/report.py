"""What a RE-ALIGN pair dataset looks like: hallucination figures of its rejected answers (shapes
world) and a picture of a few pairs with their images and retrieved images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rlalign.evaluation.captions import grounding
from rlalign.shapes import mentioned, mentioned_objects


def _truth(row: dict) -> list[dict]:
    """Ground-truth objects: the `objects` column, else what the chosen answer (a reference) names."""
    if row.get("objects"):
        return row["objects"]
    shapes, colors = mentioned(row["chosen"])
    return [{"shape": s, "color": c} for s in shapes for c in colors]


def pair_stats(dataset: Any) -> dict[str, float]:
    """How often the rejected answer names a shape or colour that is not in the image, an object (colour and
    shape) that is not there (`absent_object`, the hallucinations RE-ALIGN's rejected answers carry), or one
    that is not there or not where it says (`wrong_object`), against the chosen one; how often it differs
    from the chosen one in positions only (`rejected_only_positions`); the similarities the builder recorded."""
    cols = [
        c
        for c in ("chosen", "rejected", "objects", "similarity", "text_similarity", "tries")
        if c in dataset.column_names
    ]
    rows = dataset.select_columns(cols).to_list()
    if not rows:
        return {"pairs": 0}
    truth = [_truth(r) for r in rows]

    def names_absent(text: str, objs: list[dict]) -> bool:
        shapes, colors = mentioned(text)
        return bool(shapes - {o["shape"] for o in objs} or colors - {o["color"] for o in objs})

    def wrong_object(text: str, objs: list[dict]) -> bool:
        """Names a (colour, shape) absent from the image, or puts a present one in the wrong cell."""
        have = {(o["color"], o["shape"]) for o in objs}
        cells = {(o["color"], o["shape"], o.get("position")) for o in objs}
        return any(
            (c, s) not in have or (p is not None and (c, s, p) not in cells)
            for c, s, p in mentioned_objects(text)
        )

    def absent_object(text: str, objs: list[dict]) -> bool:
        """Names a (colour, shape) the image does not hold: an object hallucination, as the paper's are."""
        have = {(o["color"], o["shape"]) for o in objs}
        return any((c, s) not in have for c, s, _ in mentioned_objects(text))

    def only_positions(rejected: str, chosen: str) -> bool:
        """The same (colour, shape) objects as the chosen answer: the two differ in positions at most."""
        objects = sorted((c, s) for c, s, _ in mentioned_objects(rejected))
        return objects == sorted((c, s) for c, s, _ in mentioned_objects(chosen))

    rejected, chosen = [r["rejected"] for r in rows], [r["chosen"] for r in rows]
    return {
        "rejected_absent_object": float(np.mean([absent_object(t, o) for t, o in zip(rejected, truth)])),
        "chosen_absent_object": float(np.mean([absent_object(t, o) for t, o in zip(chosen, truth)])),
        "rejected_only_positions": float(np.mean([only_positions(r, c) for r, c in zip(rejected, chosen)])),
        "pairs": len(rows),
        "rejected_wrong_object": float(np.mean([wrong_object(t, o) for t, o in zip(rejected, truth)])),
        "chosen_wrong_object": float(np.mean([wrong_object(t, o) for t, o in zip(chosen, truth)])),
        "rejected_hallucinates": float(np.mean([names_absent(t, o) for t, o in zip(rejected, truth)])),
        "chosen_hallucinates": float(np.mean([names_absent(t, o) for t, o in zip(chosen, truth)])),
        "rejected_hallucination_rate": grounding(rejected, truth)["hallucination_rate"],
        "chosen_hallucination_rate": grounding(chosen, truth)["hallucination_rate"],
        "mean_image_similarity": float(np.mean([r["similarity"] for r in rows])),
        "mean_text_similarity": float(np.mean([r["text_similarity"] for r in rows])),
        "mean_tries": float(np.mean([r["tries"] for r in rows])),
    }


def render_pairs(dataset: Any, path: str | Path, n: int = 4) -> Path:
    """A PNG of the first `n` pairs: image | retrieved image | chosen vs rejected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(dataset))
    fig, axes = plt.subplots(
        n, 3, figsize=(11, 2.2 * n), squeeze=False, gridspec_kw={"width_ratios": [1, 1, 3]}
    )
    for k in range(n):
        row = dataset[k]
        retrieved_title = f"{row['retrieved_id']} ({row['similarity']:.3f})"
        panels = (
            (axes[k, 0], row["images"][0], row["image_id"]),
            (axes[k, 1], row["retrieved_images"][0], retrieved_title),
        )
        for ax, image, title in panels:
            ax.imshow(image)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
        text = axes[k, 2]
        text.axis("off")
        text.text(0, 0.75, f"chosen:   {row['chosen']}", fontsize=8, color="darkgreen", wrap=True)
        text.text(0, 0.45, f"rejected: {row['rejected']}", fontsize=8, color="darkred", wrap=True)
        text.text(
            0,
            0.15,
            f"mask: {row['mask']}  (text cos {row['text_similarity']:.2f})",
            fontsize=7,
            color="gray",
            wrap=True,
        )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
