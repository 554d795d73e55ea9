"""The RE-ALIGN miniature's settings sweep: DPO and rDPO from the demo's XE checkpoint on the demo's pairs,
over beta, learning rate and steps, 3 seeds each, scored on the *validation* split.

    rlalign demo --out reports/demo                       # XE and the pairs first
    python -m rlalign.sweep --demo reports/demo --out reports/sweep [--seeds 3]

Every run is an `rlalign train` subprocess; the steps are read off its checkpoints (`save_every` = the first
step count, all kept), so one run per (objective, beta, lr, seed) covers every step count. Each checkpoint is
scored on the validation images: greedy captions (CIDEr-D, hallucination rate, CHAIR-i / CHAIR-s against the
exact ground truth) and POPE through `rlalign eval pope` (adversarial split, validation images). The chosen
setting of each objective has the lowest mean CHAIR-i over the seeds among those whose mean CIDEr-D stays
within `--cider-tolerance` of the XE start's; `sweep.json` holds every figure, `sweep.md` the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rlalign.config.loader import RECIPES_DIR
from rlalign.config.schema import DataConfig
from rlalign.utils.io import atomic_write_text

log = logging.getLogger(__name__)

KEYS = ["chair_i", "chair_s", "hallucination_rate", "cider_d", "pope_f1/adversarial"]


def score(model_dir: Path, data: DataConfig, out: Path, pope_images: int) -> dict[str, float]:
    """Validation figures of one model folder or training checkpoint."""
    from rlalign.data.captions import load_split
    from rlalign.evaluation.captions import evaluate_captioner
    from rlalign.evaluation.chair import shapes_chair
    from rlalign.evaluation.runner import load_eval_model, pope_figures
    from rlalign.evaluation.shapes_pope import ShapesPopeConfig, question_file, write_shapes_pope

    model, processor = load_eval_model(str(model_dir))
    result = evaluate_captioner((model, processor), data, split="val")
    m = {k: result.metrics[k] for k in ("cider_d", "hallucination_rate", "object_precision")}
    res = shapes_chair(result.captions, load_split(data, "val")["objects"])
    m.update(chair_i=res.chair_i, chair_s=res.chair_s)
    questions = question_file(out / "pope-val", "adversarial")
    if not questions.is_file():
        write_shapes_pope(
            questions.parent, ShapesPopeConfig(split="val", images=pope_images), ["adversarial"]
        )
    runs = out / "runs"
    where = model_dir.relative_to(runs) if model_dir.is_relative_to(runs) else Path(model_dir.parent.name)
    m["pope_f1/adversarial"] = pope_figures(model_dir, [str(questions)], out / "eval" / where)[
        "pope_f1/adversarial"
    ]
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlalign.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="a demo report folder holding runs/xe and runs/pairs")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--objectives", nargs="+", default=["dpo", "rdpo"])
    p.add_argument("--betas", nargs="+", type=float, default=[0.1, 0.5])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 5e-5])
    p.add_argument("--steps", nargs="+", type=int, default=[100, 300], help="checkpoints scored (ascending)")
    p.add_argument("--pope-images", type=int, default=50)
    p.add_argument("--cider-tolerance", type=float, default=0.1)
    args = p.parse_args(argv)
    demo, out = Path(args.demo), Path(args.out)
    xe, pairs = demo / "runs" / "xe" / "final", demo / "runs" / "pairs" / "pairs.parquet"
    for need in (xe, pairs):
        if not need.exists():
            sys.exit(f"error: {need} is missing: run `rlalign demo --out {demo}` first")
    data = DataConfig()
    started = time.perf_counter()
    cache = out / "scores.json"
    scores: dict[str, dict] = json.loads(cache.read_text()) if cache.is_file() else {}
    if "xe" not in scores:
        scores["xe"] = score(xe, data, out, args.pope_images)
    grid = list(itertools.product(args.objectives, args.betas, args.lrs, range(args.seeds)))
    for k, (objective, beta, lr, seed) in enumerate(grid):
        name = f"{objective}-beta{beta:g}-lr{lr:g}-seed{seed}"
        run = out / "runs" / name
        if not (run / "final").exists():
            log.info("sweep %d/%d: %s", k + 1, len(grid), name)
            cmd = [
                sys.executable,
                "-m",
                "rlalign.cli",
                "train",
                str(RECIPES_DIR / f"demo/shapes-{objective}.yaml"),
                f"model.name_or_path={xe}",
                f"data.pairs_path={pairs}",
                f"objective.{objective}.beta={beta}",
                f"objective.{objective}.ref_cache_dir={out / f'ref-logps-{objective}'}",
                f"optim.lr={lr}",
                f"trainer.seed={seed}",
                f"trainer.max_steps={max(args.steps)}",
                f"trainer.save_every={min(args.steps)}",
                f"trainer.keep_last={len(args.steps) + 10}",
                "trainer.eval_every=0",
                f"trainer.output_dir={run}",
                "tracking.backend=none",
            ]
            subprocess.run(cmd, check=True)
        for steps in args.steps:
            key = f"{name}-steps{steps}"
            if key not in scores:
                folder = (
                    run / "final" if steps == max(args.steps) else run / "checkpoints" / f"step-{steps:07d}"
                )
                scores[key] = score(folder, data, out, args.pope_images)
                atomic_write_text(cache, json.dumps(scores, indent=1))
    atomic_write_text(cache, json.dumps(scores, indent=1))
    rows = []
    for objective, beta, lr, steps in itertools.product(args.objectives, args.betas, args.lrs, args.steps):
        runs = [scores[f"{objective}-beta{beta:g}-lr{lr:g}-seed{s}-steps{steps}"] for s in range(args.seeds)]
        mean = {k: float(np.mean([r[k] for r in runs])) for k in KEYS}
        std = {k: float(np.std([r[k] for r in runs])) for k in KEYS}
        rows.append(
            {"objective": objective, "beta": beta, "lr": lr, "steps": steps, "mean": mean, "std": std}
        )
    chosen = {}
    floor = scores["xe"]["cider_d"] - args.cider_tolerance
    for objective in args.objectives:
        ok = [r for r in rows if r["objective"] == objective and r["mean"]["cider_d"] >= floor]
        pick = min(ok or [r for r in rows if r["objective"] == objective], key=lambda r: r["mean"]["chair_i"])
        chosen[objective] = {k: pick[k] for k in ("beta", "lr", "steps")}
    result = {"xe": scores["xe"], "rows": rows, "chosen": chosen, "seeds": args.seeds}
    result["elapsed_s"] = time.perf_counter() - started
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=1))
    lines = [
        "# RE-ALIGN miniature: DPO / rDPO settings on the validation split\n",
        f"{args.seeds} seeds per setting, mean ± std; XE start: "
        + ", ".join(f"{k} {scores['xe'][k]:.3f}" for k in KEYS)
        + f". Chosen (lowest CHAIR-i with CIDEr-D >= {floor:.3f}): "
        + "; ".join(f"{o}: beta {c['beta']:g}, lr {c['lr']:g}, {c['steps']} steps" for o, c in chosen.items())
        + ".\n",
        "| objective | beta | lr | steps | " + " | ".join(KEYS) + " |",
        "|---|---|---|---|" + "---|" * len(KEYS),
    ]
    for r in rows:
        cells = [f"{r['mean'][k]:.3f} ± {r['std'][k]:.3f}" for k in KEYS]
        lines.append(
            f"| {r['objective']} | {r['beta']:g} | {r['lr']:g} | {r['steps']} | " + " | ".join(cells) + " |"
        )
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    sys.exit(main())
