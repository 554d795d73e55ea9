"""`rlalign demo`: the whole chain on the shapes world, on a CPU, offline, with a report.

XE warm start from a random tiny Llava -> SCST and GRPO from the XE checkpoint -> RE-ALIGN pairs
built with the XE policy -> DPO and rDPO from the XE checkpoint on those pairs. Every stage runs as
an `rlalign` subprocess, exactly as a user would run it; then every model (the random init too, saved
under runs/init) is evaluated on the test split: captions (CIDEr-D, grounding, CHAIR), POPE through
`rlalign eval pope`, template collapse and the sampled KL to the XE policy. The report folder holds
report.md (tables, plots, samples), report.json (every figure) and the run folders. XE and the pairs run
once; the RL and preference stages once per seed (3 by default). A stage
whose run folder already holds its result (`final/`, `pairs.parquet`) is reused, so a demo that
stopped part-way continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlalign.config.loader import RECIPES_DIR  # noqa: E402
from rlalign.data.captions import load_split  # noqa: E402
from rlalign.evaluation.captions import (  # noqa: E402
    CaptionEval,
    diversity_of,
    evaluate_captioner,
    load_model,
    sample_captions,
    template_collapse,
)
from rlalign.evaluation.chair import shapes_chair  # noqa: E402
from rlalign.evaluation.runner import pope_figures  # noqa: E402
from rlalign.models.builder import build_policy  # noqa: E402
from rlalign.pairs.builder import response_logprobs  # noqa: E402
from rlalign.recipe import load_recipe  # noqa: E402

log = logging.getLogger(__name__)

QUICK = ["data.train_size=200", "data.val_size=32", "data.test_size=32", "trainer.eval_size=32"]
SHOWN = [
    "cider_d",
    "bleu4",
    "hallucination_rate",
    "shape_precision",
    "object_precision",
    "distinct_2",
    "self_bleu",
]
HALLUCINATION = [
    "pope_f1/random",
    "pope_f1/popular",
    "pope_f1/adversarial",
    "pope_accuracy",
    "pope_yes_ratio",
    "chair_i",
    "chair_s",
    "hallucination_rate",
    "cider_d",
]
HACKING = ["top_template_share", "position_free_share", "distinct_1", "distinct_2", "kl_to_xe", "cider_d"]


@dataclass
class Stage:
    name: str
    command: str  # "train" or "pairs build"
    recipe: str
    inputs: Callable[[Path], list[str]]
    """Overrides that point the stage at what earlier stages wrote (given the runs folder)."""
    seeded: bool = True
    quick: tuple[str, ...] = ("trainer.max_steps=6",)


def _xe(runs: Path) -> list[str]:
    return [f"model.name_or_path={runs / 'xe' / 'final'}"]


def _pairs_for(name: str) -> Callable[[Path], list[str]]:
    return lambda runs: [
        *_xe(runs),
        f"data.pairs_path={runs / 'pairs' / 'pairs.parquet'}",
        f"objective.{name}.ref_cache_dir={runs / f'ref-logps-{name}'}",
    ]


STAGES = [
    Stage(
        "xe",
        "train",
        "demo/shapes-xe.yaml",
        lambda runs: [],
        seeded=False,
        quick=("trainer.max_steps=40", "trainer.eval_every=20"),
    ),
    Stage("scst", "train", "demo/shapes-scst.yaml", _xe),
    Stage("grpo", "train", "demo/shapes-grpo.yaml", _xe, quick=("trainer.max_steps=3",)),
    Stage(
        "pairs",
        "pairs build",
        "demo/shapes-pairs.yaml",
        lambda runs: [
            *_xe(runs),
            f"pairs.output_dir={runs / 'pairs'}",
            f"pairs.embedder.cache_dir={runs / 'embedding-cache'}",
        ],
        seeded=False,
        quick=("pairs.pool_size=48", "pairs.shard_size=16"),
    ),
    Stage("dpo", "train", "demo/shapes-dpo.yaml", _pairs_for("dpo")),
    Stage("rdpo", "train", "demo/shapes-rdpo.yaml", _pairs_for("rdpo")),
]


def _run_dir(runs: Path, stage: Stage, seed: int) -> Path:
    return runs / (f"{stage.name}-seed{seed}" if stage.seeded else stage.name)


def _run(stage: Stage, runs: Path, seed: int, quick: bool) -> Path:
    out = _run_dir(runs, stage, seed)
    if (out / ("pairs.parquet" if stage.command == "pairs build" else "final")).exists():
        log.info(
            "stage %s%s: already done in %s, reused",
            stage.name,
            f" (seed {seed})" if stage.seeded else "",
            out,
        )
        return out
    cmd = [
        sys.executable,
        "-m",
        "rlalign.cli",
        *stage.command.split(),
        str(RECIPES_DIR / stage.recipe),
        f"trainer.output_dir={out}",
        f"trainer.seed={seed}",
        "tracking.backend=none",
        *stage.inputs(runs),
        *((*QUICK, *stage.quick) if quick else ()),
    ]
    log.info(
        "stage %s%s: rlalign %s", stage.name, f" (seed {seed})" if stage.seeded else "", " ".join(cmd[3:])
    )
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    log.info("stage %s done in %.0f s", stage.name, time.perf_counter() - started)
    return out


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _plot_curves(runs_by_stage: dict[str, list[Path]], key: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, dirs in runs_by_stage.items():
        curves = [[(r["step"], r[key]) for r in _history(d) if key in r] for d in dirs]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = np.array([s for s, _ in curves[0][:n]])
        values = np.array([[v for _, v in c[:n]] for c in curves])
        ax.plot(steps, values.mean(0), label=f"{name} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)
    ax.set(xlabel="step", ylabel=key, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _printable(text: str, width: int = 110) -> str:
    """Captions of an untrained model hold arbitrary bytes; keep what a font can draw."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:width]


def _plot_samples(evals: dict[str, CaptionEval], path: Path, n: int = 6) -> None:
    first = next(iter(evals.values()))
    n = min(n, len(first.samples))
    fig, axes = plt.subplots(n, 1, figsize=(10, 1.6 * n))
    for i, ax in enumerate(np.atleast_1d(axes)):
        sample = first.samples[i]
        ax.imshow(sample["image"])
        ax.set_axis_off()
        lines = [f"{name:>5}: {e.samples[i]['caption']}" for name, e in evals.items()] + [
            f"  ref: {sample['refs'][0]}"
        ]
        ax.text(
            1.08, 0.5, "\n".join(lines), transform=ax.transAxes, va="center", fontsize=7, family="monospace"
        )
    fig.subplots_adjust(left=0.01, right=0.15, hspace=0.35)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _table(rows: dict[str, dict[str, float]], spread: dict[str, dict[str, float]], keys: list[str]) -> str:
    head = "| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"

    def cell(name: str, key: str) -> str:
        value = rows[name].get(key)
        if value is None:
            return "–"
        sd = spread.get(name, {}).get(key)
        return f"{value:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    return head + "".join(f"| {name} | " + " | ".join(cell(name, k) for k in keys) + " |\n" for name in rows)


def _evaluate(
    model_dir: Path, data, objects: list, xe: tuple | None, out: Path, pope_images: int
) -> CaptionEval:
    """Captions (CIDEr-D, grounding, CHAIR against `objects`, the test split's ground truth), template collapse,
    diversity and KL to the XE policy of sampled captions, and POPE, of one model folder."""
    model, processor = load_model(model_dir)
    result = evaluate_captioner((model, processor), data, split="test")
    result.metrics.update(shapes_chair(result.captions, objects).metrics())
    result.metrics.update(template_collapse(result.captions))
    images, caps = sample_captions(model, processor, data, limit=50, samples=5)
    result.metrics.update(diversity_of(caps, 5))
    if xe is not None:
        result.metrics["kl_to_xe"] = sampled_kl(model, xe[0], processor, images, caps, data.prompt)
    result.metrics.update(pope_figures(model_dir, ["shapes"], out, ("--shapes-images", str(pope_images))))
    return result


@torch.no_grad()
def sampled_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    processor: Any,
    images: list,
    captions: list[str],
    prompt: str = "",
    batch_size: int = 32,
) -> float:
    """Monte Carlo KL(policy || reference) in nats per caption: the mean over captions sampled from the
    policy of log policy(caption) - log reference(caption), each the sum over the caption's tokens (its
    end token left out) given its image and the prompt."""
    diffs = []
    for start in range(0, len(images), batch_size):
        ims, caps = images[start : start + batch_size], captions[start : start + batch_size]
        keep = [i for i, c in enumerate(caps) if c.strip()]
        if not keep:
            continue
        ims, caps = [ims[i] for i in keep], [caps[i] for i in keep]
        groups = list(range(len(ims)))
        lp = response_logprobs(policy, processor, ims, prompt, caps, groups)
        lq = response_logprobs(reference, processor, ims, prompt, caps, groups)
        diffs.append(lp - lq)
    return float(torch.cat(diffs).mean()) if diffs else 0.0


def _plot_reward_kl(rows: dict[str, list[dict[str, float]]], path: Path) -> None:
    """CIDEr-D of greedy test captions against the sampled KL to the XE policy, one point per run (the random
    init left out)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in rows.items():
        if name == "init":  # hundreds of nats away: it would flatten the rest
            continue
        pts = [(m["kl_to_xe"], m["cider_d"]) for m in runs if "kl_to_xe" in m]
        if pts:
            ax.scatter(*zip(*pts), label=name, s=30)
    ax.set(xlabel="KL(policy || XE) on sampled captions (nats / caption)", ylabel="test CIDEr-D")
    ax.set_title("reward vs distance from the XE start (one point per seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CLAIM_KEYS = {
    "chair_i": "CHAIR-i",
    "chair_s": "CHAIR-s",
    "hallucination_rate": "hallucination rate",
    "pope_f1/random": "POPE F1 random",
    "pope_f1/popular": "POPE F1 popular",
    "pope_f1/adversarial": "POPE F1 adversarial",
    "cider_d": "CIDEr-D",
}


def _claim(rows: dict[str, dict[str, float]], spread: dict[str, dict[str, float]], seeds: int) -> str:
    """RE-ALIGN's claim (rDPO lowers hallucination and raises POPE F1, against the start and against DPO)
    read off this run: each figure of rDPO against XE and DPO, called a change only when the gap exceeds
    twice the larger seed spread of the two."""
    if not {"rdpo", "dpo", "xe"} <= rows.keys():
        return ""

    def verdict(a: str, b: str, key: str) -> str:
        gap = rows[a][key] - rows[b][key]
        noise = 2 * max(spread.get(a, {}).get(key, 0.0), spread.get(b, {}).get(key, 0.0))
        if seeds < 2:
            return f"{gap:+.3f}"
        word = "within seed noise" if abs(gap) <= noise else ("higher" if gap > 0 else "lower")
        return f"{gap:+.3f} ({word})"

    lines = [
        "| figure | xe | dpo | rdpo | rdpo - xe | rdpo - dpo |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in CLAIM_KEYS.items():
        cells = [f"{rows[n][key]:.3f}" for n in ("xe", "dpo", "rdpo")]
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {verdict('rdpo', 'xe', key)} | {verdict('rdpo', 'dpo', key)} |"
        )
    note = (
        f"Differences of means over {seeds} seeds; a difference is called higher / lower only when it exceeds "
        "twice the larger standard deviation across seeds of the two methods."
        if seeds > 1
        else "One seed: no spread to judge the differences by (run with --seeds 3)."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def _retrieval_text(stats: dict) -> str:
    """Whether the embeddings tell images apart, in two sentences."""
    if not stats:
        return ""
    near, other = stats["nearest_similarity"], stats["unrelated_similarity"]
    text = (
        f"Retrieval: cosine to the nearest other pool image {near['mean']:.3f} (median {near['p50']:.3f}), to an "
        f"unrelated one {other['mean']:.3f} (5-95 %: {other['p5']:.2f} to {other['p95']:.2f})."
    )
    if "nearest" in stats:
        n, u = stats["nearest"], stats["unrelated"]
        text += (
            f" The nearest image holds an object of the query (same colour and shape) for "
            f"{n['shares_an_object']:.1%} of images ({u['shares_an_object']:.1%} for an unrelated one), all of "
            f"its objects for {n['same_objects']:.1%} ({u['same_objects']:.1%})."
        )
    return text + "\n"


def run_demo(out: Path, *, seeds: int = 3, quick: bool = False, stages: list[str] | None = None) -> Path:
    """Run the stages (all by default; an earlier stage a chosen one needs must have run), evaluate,
    write `out/report.md`; returns its path."""
    names = [s.name for s in STAGES]
    unknown = set(stages or []) - set(names)
    if unknown:
        raise ValueError(f"unknown demo stage(s) {sorted(unknown)} (valid: {', '.join(names)})")
    chosen = [s for s in STAGES if stages is None or s.name in stages]
    runs = out / "runs"
    started = time.perf_counter()
    timings: dict[str, float] = {}
    done: dict[str, list[Path]] = {}
    for stage in chosen:
        t0 = time.perf_counter()
        done[stage.name] = [
            _run(stage, runs, seed, quick) for seed in (range(seeds) if stage.seeded else [0])
        ]
        timings[stage.name] = time.perf_counter() - t0
    recipe = load_recipe(RECIPES_DIR / "demo/shapes-xe.yaml", list(QUICK) if quick else [])
    data = recipe.data
    init_dir = runs / "init" / "final"
    if not (init_dir / "config.json").is_file():  # the random start, saved so it is evaluated like the rest
        init_model, init_processor = build_policy(recipe.model, data)
        init_model.save_pretrained(init_dir)
        init_processor.save_pretrained(init_dir)
    pope_images = 30 if quick else 100
    xe = load_model(done["xe"][0] / "final") if "xe" in done else None
    objects = load_split(data, "test")["objects"]
    evals: dict[str, list[CaptionEval]] = {}
    for name, dirs in {"init": [init_dir.parent], **done}.items():
        if name != "pairs":
            evals[name] = [
                _evaluate(d / "final", data, objects, xe, out / "eval" / d.name, pope_images) for d in dirs
            ]
    init = evals["init"][0]
    rows = {
        name: {k: float(np.mean([e.metrics[k] for e in es])) for k in es[0].metrics}
        for name, es in evals.items()
    }
    spread = {
        name: {k: float(np.std([e.metrics[k] for e in es])) for k in es[0].metrics}
        for name, es in evals.items()
        if len(es) > 1
    }
    anchor = "xe" if "xe" in evals else "init"
    chance = {k.removeprefix("chance/"): v for k, v in rows[anchor].items() if k.startswith("chance/")}
    report: dict = {
        "metrics": {**rows, "chance": chance},
        "runs": {name: [e.metrics for e in es] for name, es in evals.items()},
        "spread": spread,
        "seeds": seeds,
        "quick": quick,
        "stage_seconds": timings,
        "test_images": len(init.image_ids),
    }
    md = [
        "# rlalign demo: the shapes world\n",
        f"A tiny Llava from random weights, trained on CPU. {len(init.image_ids)} held-out test images, greedy "
        f"captions; {seeds} seed(s) per RL / preference method (mean ± std over seeds). "
        f"Stage times: {', '.join(f'{k} {v:.0f} s' if v >= 1 else f'{k} reused' for k, v in timings.items())}"
        f"{' (quick mode)' if quick else ''}.\n",
        "## Test split\n",
        _table({**rows, "chance": chance}, spread, SHOWN),
        "\n`chance`: each image scored against another image's reference caption (a model that ignores its "
        "input). hallucination_rate: share of mentioned shapes and colours not in the image (lower is better). "
        "distinct_2 / self_bleu: diversity over 5 sampled captions per image (higher / lower is more diverse).\n",
        "## Hallucination: POPE and CHAIR\n",
        _table(rows, spread, HALLUCINATION),
        f"\nPOPE: `rlalign eval pope MODEL shapes` on {pope_images} test images (yes/no questions in POPE's "
        "template; negatives drawn at random, as the most frequent absent object, and as the object most often "
        "seen with the one just asked about); F1 per split, accuracy and yes-ratio averaged over the splits. "
        "CHAIR-i / CHAIR-s: share of mentioned objects / of captions with an object the image lacks, against "
        "the exact ground truth. The XE start learns the yes/no questions from `data.yes_no_questions`; "
        "the later stages train on captions only.\n",
        "## RE-ALIGN's claim on this miniature\n",
        "RE-ALIGN reports that rDPO lowers hallucination and raises POPE F1 against the start and against DPO.\n",
        _claim(rows, spread, seeds),
        "## Reward hacking\n",
        _table(rows, spread, HACKING),
        "\ntop_template_share: share of greedy test captions written in the most common template (object "
        "lists folded); position_free_share: captions naming objects but no position (CIDEr-D's easy "
        "n-grams); distinct-n over sampled captions; kl_to_xe: KL(policy || XE) estimated on 5 sampled "
        "captions of each of 50 test images (nats per caption).\n",
        "![reward vs KL](reward_kl.png)\n",
    ]
    _plot_reward_kl({name: [e.metrics for e in es] for name, es in evals.items()}, out / "reward_kl.png")
    if "xe" in done:
        hist = _history(done["xe"][0])
        vals = [r["val/loss"] for r in hist if "val/loss" in r]
        report["val_loss"] = {"xe": {"first": vals[0], "last": vals[-1]}}
        _plot_curves({"xe": done["xe"]}, "val/loss", "XE validation loss", out / "learning_curve.png")
        md += [
            "## XE\n",
            f"Validation loss {vals[0]:.3f} (first eval) → {vals[-1]:.3f} (last).\n",
            "![learning curve](learning_curve.png)\n",
        ]
    rl = {k: v for k, v in done.items() if k in ("scst", "grpo")}
    if rl:
        _plot_curves(
            rl, "reward_mean", "sampled-caption reward (CIDEr-D), spread across seeds", out / "rewards.png"
        )
        md += [
            "## SCST and GRPO\n",
            "Both start from the XE checkpoint with the same budget of sampled captions.\n",
            "![rewards](rewards.png)\n",
        ]
    if "pairs" in done:
        from datasets import Dataset

        from rlalign.pairs.report import pair_stats, render_pairs

        pairs = Dataset.from_parquet(str(done["pairs"][0] / "pairs.parquet"))
        report["pairs"] = pair_stats(pairs)
        built = json.loads((done["pairs"][0] / "stats.json").read_text())
        report["retrieval"] = built.get("retrieval", {})
        report["pairs"]["chosen_from_policy"] = built.get("chosen_from_policy", 0.0)
        render_pairs(pairs, out / "pairs.png", 4)
        md += [
            "## RE-ALIGN pairs\n",
            _retrieval_text(report["retrieval"]),
            "```\n" + json.dumps(report["pairs"], indent=1) + "\n```\n",
            "![pairs](pairs.png)\n",
        ]
    pref = {k: v for k, v in done.items() if k in ("dpo", "rdpo")}
    if pref:
        report["preference"] = {
            k: {m: v for m, v in _history(dirs[0])[-1].items() if m.startswith("val/")}
            for k, dirs in pref.items()
        }
        _plot_curves(pref, "rewards/margins", "DPO / rDPO reward margin (train)", out / "preference.png")
        md += [
            "## DPO and rDPO\n",
            "Final validation preference metrics (seed 0):\n",
            "```\n" + json.dumps(report["preference"], indent=1) + "\n```\n",
            "![margins](preference.png)\n",
        ]
    shown = {name: es[0] for name, es in evals.items()}
    _plot_samples(shown, out / "samples.png")
    md += ["## Sample captions\n", "![samples](samples.png)\n"]
    report["elapsed_s"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"
