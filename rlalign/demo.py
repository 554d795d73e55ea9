"""`rlalign demo`: the whole chain on the shapes world, on a CPU, offline, with a report.

Stages run as `rlalign train` subprocesses, exactly as a user would run them, then every model is
evaluated on the test split. The report folder holds report.md (tables, plots, sample captions),
report.json (all figures, for machines) and the run folders.

Today's chain: XE warm start from a random tiny Llava. Later stages (SCST / GRPO, pairs, DPO /
rDPO) add themselves to `STAGES`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlalign.config import load_recipe  # noqa: E402
from rlalign.config.loader import RECIPES_DIR  # noqa: E402
from rlalign.evaluate import CaptionEval, evaluate_captioner  # noqa: E402
from rlalign.models.builder import build_policy  # noqa: E402

log = logging.getLogger(__name__)

QUICK = ["trainer.max_steps=40", "trainer.eval_every=20", "data.train_size=200", "data.val_size=32",
         "data.test_size=32", "trainer.eval_size=32"]  # fmt: skip
SHOWN = ["cider_d", "bleu4", "hallucination_rate", "shape_precision", "shape_recall", "object_precision"]


@dataclass
class Stage:
    name: str
    recipe: str
    seed_key: str = "trainer.seed"


STAGES = [Stage("xe", "demo/shapes-xe.yaml")]


def _train(stage: Stage, out: Path, seed: int, quick: bool) -> Path:
    run_dir = out / "runs" / f"{stage.name}-seed{seed}"
    cmd = [sys.executable, "-m", "rlalign.cli", "train", str(RECIPES_DIR / stage.recipe),
           f"trainer.output_dir={run_dir}", f"{stage.seed_key}={seed}", "tracking.backend=none",
           *(QUICK if quick else [])]  # fmt: skip
    log.info("stage %s (seed %d): %s", stage.name, seed, " ".join(cmd[3:]))
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    log.info("stage %s done in %.0f s", stage.name, time.perf_counter() - started)
    return run_dir


def _curve(run_dirs: dict[str, list[Path]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, dirs in run_dirs.items():
        for i, d in enumerate(dirs):
            rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            label = name if i == 0 else None
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], alpha=0.5, label=f"{label} train" if label else None)
            val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
            ax.plot(*zip(*val), "o-", label=f"{label} val" if label else None)
    ax.set(xlabel="optimizer step", ylabel="token NLL", title="XE learning curve (shapes world)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _samples(evals: dict[str, CaptionEval], path: Path, n: int = 6) -> None:
    first = next(iter(evals.values()))
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.5 * n))
    for i, ax in enumerate(axes):
        sample = first.samples[i]
        ax.imshow(sample["image"])
        ax.set_axis_off()
        lines = [f"{name}: {e.samples[i]['caption']}" for name, e in evals.items()] + [f"ref: {sample['refs'][0]}"]
        ax.text(1.08, 0.5, "\n".join(lines), transform=ax.transAxes, va="center", fontsize=8, family="monospace")
    fig.subplots_adjust(left=0.01, right=0.2, hspace=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _table(rows: dict[str, dict[str, float]]) -> str:
    head = "| model | " + " | ".join(SHOWN) + " |\n|---|" + "---|" * len(SHOWN) + "\n"
    return head + "".join(
        f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.3f}" for k in SHOWN) + " |\n" for name, m in rows.items()
    )


def run_demo(out: Path, *, seeds: int = 1, quick: bool = False, stages: list[str] | None = None) -> Path:
    """Train the stages (all by default) for `seeds` seeds, evaluate, write `out/report.md`; returns its path."""
    chosen = [s for s in STAGES if stages is None or s.name in stages]
    unknown = set(stages or []) - {s.name for s in STAGES}
    if unknown:
        raise ValueError(f"unknown demo stage(s) {sorted(unknown)} (valid: {', '.join(s.name for s in STAGES)})")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run_dirs = {s.name: [_train(s, out, seed, quick) for seed in range(seeds)] for s in chosen}
    recipe = load_recipe(RECIPES_DIR / STAGES[0].recipe, QUICK if quick else [])
    data = recipe.data
    evals = {"init": evaluate_captioner(build_policy(recipe.model, data), data, split="test")}
    for name, dirs in run_dirs.items():
        evals[name] = evaluate_captioner(dirs[0] / "final", data, split="test")
    rows = {name: e.metrics for name, e in evals.items()}
    rows["chance"] = {k.removeprefix("chance/"): v for k, v in evals["xe"].metrics.items() if k.startswith("chance/")}
    val = {}
    for name, dirs in run_dirs.items():
        lines = [json.loads(line) for line in (dirs[0] / "metrics.jsonl").read_text().splitlines()]
        vals = [r["val/loss"] for r in lines if "val/loss" in r]
        val[name] = {"first": vals[0], "last": vals[-1]}
    _curve(run_dirs, out / "learning_curve.png")
    _samples(evals, out / "samples.png")
    elapsed = time.perf_counter() - started
    report = {"metrics": rows, "val_loss": val, "seeds": seeds, "quick": quick, "elapsed_s": elapsed,
              "test_images": len(evals["xe"].image_ids)}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1))
    md = [
        "# rlalign demo: the shapes world\n",
        f"A tiny Llava (random init) trained on CPU; {len(evals['xe'].image_ids)} held-out test images, greedy "
        f"captions. Total time {elapsed:.0f} s{' (quick mode)' if quick else ''}.\n",
        "## Test split\n",
        _table(rows),
        "\n`chance`: each image scored against another image's reference caption (a model that ignores its input). "
        "hallucination_rate: share of mentioned shapes and colours that are not in the image (lower is better).\n",
        "## Learning curve\n",
        f"XE validation loss {val['xe']['first']:.3f} (first eval) → {val['xe']['last']:.3f} (last).\n",
        "![learning curve](learning_curve.png)\n",
        "## Sample captions\n",
        "![samples](samples.png)\n",
    ]
    md += [f"- `{e.image_ids[i]}` xe: *{e.captions[i]}*\n" for e in [evals["xe"]] for i in range(min(8, len(e.captions)))]
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"
