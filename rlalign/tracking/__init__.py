"""Metrics: metrics.jsonl + console on the main process, W&B through accelerate's tracker.

Rank behaviour is decided once: ranks other than the main one get a tracker that does nothing.
W&B runs online when WANDB_API_KEY is set, offline otherwise (`tracking.mode: auto`), and not at
all with `tracking.backend: none` or `mode: disabled` (nothing is written).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rlalign.config.schema import TrackingConfig
from rlalign.utils.io import atomic_write_text

log = logging.getLogger(__name__)
CONSOLE_KEYS = ("loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "reward/mean", "kl")


def wandb_mode(cfg: TrackingConfig) -> str | None:
    """The W&B mode to use, or None when W&B is off."""
    if cfg.backend == "none" or cfg.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """Main-process tracker: appends metrics.jsonl, prints a compact line, forwards to W&B."""

    def __init__(self, cfg: TrackingConfig, output_dir: Path, accelerator: Any, config: dict[str, Any]):
        self.accelerator = accelerator
        self.console_every = cfg.console_every
        self.path = output_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.use_wandb = wandb_mode(cfg) is not None
        if self.use_wandb:
            init = {"dir": str(output_dir), "mode": wandb_mode(cfg), "name": cfg.run_name or output_dir.name}
            accelerator.init_trackers(cfg.project, config=config, init_kwargs={"wandb": init})

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint, so the file holds one trajectory."""
        if not self.path.is_file():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= step
        ]
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def log(self, metrics: dict[str, float], step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.console_every and (
            step % self.console_every == 0 or any(k.startswith("val/") for k in metrics)
        ):
            shown = {k: v for k, v in metrics.items() if k in CONSOLE_KEYS or k.startswith("val/")}
            log.info("step %d  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        if self.use_wandb:
            self.accelerator.log(metrics, step=step)

    def finish(self) -> None:
        if self.use_wandb:
            self.accelerator.end_training()


class NullTracker:
    def truncate_after(self, step: int) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def make_tracker(
    cfg: TrackingConfig, output_dir: Path, accelerator: Any, config: dict[str, Any]
) -> Tracker | NullTracker:
    if not accelerator.is_main_process:
        return NullTracker()
    return Tracker(cfg, output_dir, accelerator, config)
