"""`rlalign bench dpo`: our DPO and rDPO training steps against TRL's `DPOTrainer` on the same tiny
VLM, data and batch, in the same run.

One step = collate the batch (images processed) + policy and reference forwards + loss + backward +
AdamW step. TRL's step runs its own collator (`DataCollatorForVisionPreference`) and `compute_loss`
(concatenated chosen/rejected forward, the image encoded twice); ours packs chosen and rejected into
one row (image and prompt run once). Repetitions alternate ours / TRL; medians are reported. Ends
with one JSON line; `ratio` = our DPO samples/s / TRL's.

    rlalign bench dpo [--batch 8] [--steps 5] [--reps 3] [--image-size 48] [--text-hidden 128]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from rlalign.config.schema import DataConfig, TinyModelConfig
from rlalign.data.preference import PreferenceCollator, PreferencePairs, shapes_preferences
from rlalign.models.tiny import build_tiny_llava
from rlalign.objectives.dpo import DPOConfig, DPOObjective
from rlalign.objectives.rdpo import RDPOConfig, RDPOObjective
from rlalign.shapes import ShapesConfig
from rlalign.utils.tensors import to_device


class _Ref:
    def __init__(self, model):
        self.model, self.mode, self.forward_calls = model, "copy", 0

    def __call__(self, **inputs):
        with torch.no_grad():
            return self.model(**inputs)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def run(args: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="rlalign bench dpo")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--text-hidden", type=int, default=128)
    a = p.parse_args(args)
    import datasets
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    datasets.disable_progress_bars()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = ShapesConfig(image_size=a.image_size)
    base, processor = build_tiny_llava(TinyModelConfig(text_hidden=a.text_hidden), shapes)
    table = shapes_preferences(shapes, "train", a.batch * a.steps)
    rows = PreferencePairs(table, processor, DataConfig(), retrieved=True)
    batches = [[rows[i] for i in range(s * a.batch, (s + 1) * a.batch)] for s in range(a.steps)]
    eos = processor.tokenizer.eos_token
    trl_batches = [
        [
            {
                "images": [r["image"]],
                "prompt": processor.image_token + r["prompt"],
                "chosen": r["chosen"] + eos,
                "rejected": r["rejected"] + eos,
            }
            for r in b
        ]
        for b in batches
    ]

    def ours(objective, retrieved):
        model, ref = copy.deepcopy(base).to(device).train(), _Ref(copy.deepcopy(base).to(device).eval())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        collate = PreferenceCollator(processor, 48, None, retrieved=retrieved)

        def step(b):
            batch = to_device(collate(b), device)
            loss, _ = objective.loss(model, batch, items_per_micro=len(b), reference=ref)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def trl():
        model = copy.deepcopy(base).to(device).train()
        cfg = TRLConfig(
            output_dir="/tmp/rlalign-bench-trl",
            beta=0.1,
            per_device_train_batch_size=a.batch,
            report_to=[],
            use_cpu=device.type == "cpu",
            max_length=None,
            bf16=False,
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=copy.deepcopy(base).to(device).eval(),
            args=cfg,
            processing_class=processor,
            train_dataset=datasets.Dataset.from_list(trl_batches[0]),
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step(b):
            inputs = to_device(trainer.data_collator([dict(r) for r in b]), device)
            trainer.compute_loss(trainer.model, inputs).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    runners = {
        "dpo": ours(DPOObjective(DPOConfig(beta=0.1)), False),
        "rdpo": ours(RDPOObjective(RDPOConfig(beta=0.1)), True),
        "trl": trl(),
    }
    src = {"dpo": batches, "rdpo": batches, "trl": trl_batches}
    times: dict[str, list[float]] = {k: [] for k in runners}
    peaks: dict[str, float | None] = {}
    for name, step in runners.items():  # warm-up
        step(src[name][0])
    for _ in range(a.reps):
        for name, step in runners.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for b in src[name]:
                step(b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
            peaks[name] = _peak_mb(device)
    sps = {k: a.batch * a.steps / statistics.median(v) for k, v in times.items()}
    print(f"{'':6} {'samples/s':>10} {'peak MB':>9}", file=sys.stderr)
    for k in runners:
        print(f"{k:6} {sps[k]:10.1f} {peaks[k] or float('nan'):9.1f}", file=sys.stderr)
    result = {
        "bench": "dpo",
        "peer": "trl",
        "ratio": round(sps["dpo"] / sps["trl"], 3),
        "rdpo_ratio": round(sps["rdpo"] / sps["trl"], 3),
        "ours_samples_per_s": round(sps["dpo"], 2),
        "rdpo_samples_per_s": round(sps["rdpo"], 2),
        "peer_samples_per_s": round(sps["trl"], 2),
        "peak_mem_mb": peaks["dpo"],
        "rdpo_peak_mem_mb": peaks["rdpo"],
        "peer_peak_mem_mb": peaks["trl"],
        "batch": a.batch,
        "steps": a.steps,
        "reps": a.reps,
        "device": device.type,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
