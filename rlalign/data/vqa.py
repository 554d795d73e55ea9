"""Exact-answer accuracy of a saved model on the shapes-world questions (`data.source: shapes_vqa`).

    python -m rlalign.data.vqa MODEL [--split test] [--size 200]

writes one JSON line: greedy `accuracy` (the `answer_accuracy` reward, answer read from `<answer>...</answer>`)
and `format` rate over the split's first `size` questions, and the accuracy per question kind. The same
numbers the GRPO rewards give, with greedy decoding instead of sampling.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from rlalign.config.schema import ModelConfig
from rlalign.data.captions import shapes_vqa_dataset
from rlalign.data.collate import encode_prompts
from rlalign.models.builder import load_base
from rlalign.rewards.verifiable import AnswerAccuracy, FormatReward
from rlalign.shapes import VQA_KINDS, ShapesConfig


@torch.no_grad()
def answers(
    model: Any, processor: Any, images: list, prompts: list[str], max_new_tokens: int = 24
) -> list[str]:
    """Greedy answers, decoded without special tokens and stripped."""
    tok = processor.tokenizer
    enc = encode_prompts(processor, images, prompts)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return [
        t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    ]


def accuracy(
    model_path: str,
    *,
    split: str = "test",
    size: int = 200,
    seed: int = 0,
    image_size: int = 48,
    batch: int = 50,
) -> dict[str, Any]:
    """Greedy exact-answer accuracy and format rate of a saved model on a split, overall and per question kind."""
    model, processor = load_base(ModelConfig(name_or_path=model_path))
    model.eval()
    data = shapes_vqa_dataset(ShapesConfig(seed=seed, image_size=image_size), split, size)
    texts: list[str] = []
    for start in range(0, size, batch):
        rows = data[start : start + batch]
        texts += answers(model, processor, rows["image"], rows["prompt"])
    correct = AnswerAccuracy()(texts, solution=data["solution"])
    result: dict[str, Any] = {
        "model": model_path,
        "split": split,
        "size": size,
        "accuracy": sum(correct) / size,
        "format": sum(FormatReward()(texts)) / size,
    }
    for kind in VQA_KINDS:
        hits = [c for c, k in zip(correct, data["question_kind"]) if k == kind]
        result[f"accuracy/{kind}"] = round(sum(hits) / len(hits), 4) if hits else None
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlalign.data.vqa", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder (e.g. runs/demo/vqa-xe/final)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.stdout.write(
        json.dumps(accuracy(args.model, split=args.split, size=args.size, seed=args.seed)) + "\n"
    )


if __name__ == "__main__":
    main()
