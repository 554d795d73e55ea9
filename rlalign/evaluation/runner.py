"""`rlalign eval pope | chair | captions`: one model over one benchmark, sharded over ranks, JSON and a
Markdown table out.

    rlalign eval pope MODEL coco_pope_random.json coco_pope_popular.json --images val2014/ --out OUT
    rlalign eval pope MODEL shapes --shapes-images 100 --out OUT     # shapes world's POPE splits
    rlalign eval chair MODEL coco_chair.jsonl --synonyms synonyms.txt --out OUT
    rlalign eval chair MODEL shapes --limit 200 --out OUT          # shapes world, exact ground truth
    rlalign eval captions MODEL recipes/demo/shapes-xe.yaml --out OUT
    accelerate launch --num_processes 8 -m rlalign.evaluation.runner pope MODEL ... --out OUT

MODEL is a folder `from_pretrained` reads (what training exports as `final/`, or a hub-format model),
or a training checkpoint (`step-XXXXXXX/` with `COMPLETE`, rebuilt from its `recipe.yaml`). With
`--predictions FILE...` no model is run: the answers or captions in the files are scored (POPE's own
workflow), and every positional argument is data.

Data: for `pope`, question files in POPE's format (see `pope.py`; image names resolve against `--images`,
by default the file's folder), or `shapes`: the shapes world's three splits, written under OUT/shapes-pope
by `evaluation/shapes_pope.py`, then read like any POPE file. For `chair` and `captions`, a caption dataset (a
local dataset folder or file as `data.path` takes it, a recipe YAML whose `data` section is used, or
`shapes` for the shapes world), for `chair` with an `objects` column (object names; the shapes world's
ground truth needs none). Files are read with `datasets`, local only.

Sharding: rank r of W generates for items [r*N//W, (r+1)*N//W) with its own replica of the model (no
ZeRO / FSDP: evaluation needs no optimizer state), the predictions are gathered in item order and rank
0 scores and writes them, so the figures do not depend on the number of ranks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rlalign.config import RecipeError
from rlalign.data.images import BadRowError, CellError, ImageReader, bad_row, in_column
from rlalign.utils.io import atomic_write_text
from rlalign.utils.tensors import to_device

log = logging.getLogger(__name__)

BENCHMARKS = ("pope", "chair", "captions")


# -- sharding, model, generation ------------------------------------------------------------------
def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Items [start, stop) of `rank`: contiguous, disjoint, in order, sizes differing by at most one."""
    return rank * n // world, (rank + 1) * n // world


def load_eval_model(path: str, dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
    """A model folder (`from_pretrained`) or a training checkpoint (weights + recipe), in eval mode."""
    from rlalign.config.schema import ModelConfig
    from rlalign.models.builder import load_base

    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        model, processor = load_base(ModelConfig(name_or_path=str(folder), dtype=dtype))
        return model.eval(), processor
    if (folder / "COMPLETE").is_file() and (folder / "recipe.yaml").is_file():
        from safetensors.torch import load_file

        from rlalign.config import read_recipe as load_recipe
        from rlalign.models.builder import build_policy
        from rlalign.runtime import SHARDED_DIR

        recipe = load_recipe(folder / "recipe.yaml")
        model, processor = build_policy(recipe.model, recipe.data)
        if (folder / SHARDED_DIR).is_dir():  # an FSDP2 run's shards, read whole into this one process
            import torch.distributed.checkpoint as dcp

            state = {"model": model.state_dict()}
            dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR), no_dist=True)
            model.load_state_dict(state["model"])
        else:
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
        if recipe.model.lora is not None:
            model = model.merge_and_unload()
        return model.eval(), processor
    raise RecipeError(
        f"{folder}: not a model folder (no config.json) nor a training checkpoint (no COMPLETE)"
    )


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers, one per (image, prompt), decoded without special tokens and stripped."""
    from rlalign.data.collate import encode_prompts

    out: list[str] = []
    for start in range(0, len(images), batch_size):
        enc = encode_prompts(
            processor,
            list(images[start : start + batch_size]),
            list(prompts[start : start + batch_size]),
            padding_side="left",
        )
        enc = to_device(enc, model.device)
        ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
        out += [
            t.strip()
            for t in processor.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
    return out


class Generator:
    """The model replica of this rank and the sharded generation over all ranks."""

    def __init__(self, args: argparse.Namespace):
        from rlalign.runtime import Runtime

        self.runtime = Runtime.for_tools()
        self.model, self.processor = load_eval_model(args.model, args.dtype)
        self.model.to(self.runtime.device)
        self.batch_size = args.batch_size

    def __call__(self, n: int, item: Callable[[int], tuple[Any, str]], max_new_tokens: int) -> list[str]:
        """Answers to items 0..n-1 (`item(i)` = (image, prompt)), this rank generating its shard only."""
        start, stop = shard_bounds(n, self.runtime.rank, self.runtime.world_size)
        images, prompts = zip(*(item(i) for i in range(start, stop))) if stop > start else ((), ())
        local = generate(
            self.model,
            self.processor,
            images,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=self.batch_size,
        )
        answers = [a for part in self.runtime.all_gather_object(local) for a in part]
        if len(answers) != n:
            raise RuntimeError(f"gathered {len(answers)} answers for {n} items")
        return answers

    @property
    def world_size(self) -> int:
        return self.runtime.world_size

    def done(self) -> bool:
        """Wait for every rank; True on the rank that writes."""
        self.runtime.barrier()
        return self.runtime.is_main


# -- writing --------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> None:
    """Write through a temporary file, so a crash never leaves a half-written result."""
    atomic_write_text(path, text)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]) + "\n"


def _report(out: Path, name: str, result: dict, table: str) -> None:
    _write(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    _write(out / f"{name}.md", f"# {name}: {result['model']}\n\n{table}")
    log.info("%s -> %s\n%s", name, out / f"{name}.json", table)


# -- predictions files ----------------------------------------------------------------------------
def read_predictions(path: Path, key_column: str, value_columns: Sequence[str]) -> list[dict]:
    """Rows of a JSON-lines predictions file with the value in one of `value_columns` (first found)."""
    from rlalign.data.captions import read_data_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file")
    ds = read_data_file(path)
    column = next((c for c in value_columns if c in ds.column_names), None)
    if column is None:
        raise BadRowError(f"{path}: no column {' or '.join(map(repr, value_columns))}")
    keys = ds[key_column] if key_column in ds.column_names else [None] * len(ds)
    rows = []
    for row, (key, value) in enumerate(zip(keys, ds[column])):
        if not isinstance(value, str):
            raise BadRowError(
                f"{path} row {row}, column '{column}': expected text, got {type(value).__name__}"
            )
        rows.append({"key": key, "value": value})
    return rows


def _match(path: Path, preds: list[dict], keys: list[Any], what: str) -> list[str]:
    """Predictions in the order of `keys`: by key when the file has keys, else by position."""
    if preds and preds[0]["key"] is not None:
        by_key = {str(p["key"]): p["value"] for p in preds}
        missing = [k for k in keys if str(k) not in by_key]
        if missing:
            raise BadRowError(f"{path}: no prediction for {what} {missing[0]} ({len(missing)} missing)")
        return [by_key[str(k)] for k in keys]
    if len(preds) != len(keys):
        raise BadRowError(f"{path}: {len(preds)} predictions for {len(keys)} {what}s")
    return [p["value"] for p in preds]


# -- pope -----------------------------------------------------------------------------------------
def _limited(ds: Any, limit: int | None) -> Any:
    return ds if limit is None else ds.select(range(min(limit, len(ds))))


def _pope_item(ds: Any, path: Path, reader: ImageReader, suffix: str) -> Callable[[int], tuple[Any, str]]:
    """Question i of `ds` as (decoded image, prompt); an unreadable image names the file, row and column."""

    def item(i: int) -> tuple[Any, str]:
        row = ds[i]
        try:
            with in_column("image"):
                image = reader.read(row["image"])
        except CellError as err:
            raise bad_row(str(path), i, err) from None
        return image, row["text"] + suffix

    return item


def _shapes_pope(args: argparse.Namespace, gen: Generator | None) -> list[str]:
    """The shapes world's POPE files (random, popular, adversarial), written under OUT/shapes-pope by the
    writing rank while the others wait."""
    from rlalign.evaluation.pope import SPLITS
    from rlalign.evaluation.shapes_pope import ShapesPopeConfig, question_file, write_shapes_pope

    folder = Path(args.out) / "shapes-pope"
    if gen is None or gen.runtime.is_main:
        write_shapes_pope(folder, ShapesPopeConfig(images=args.shapes_images))
    if gen is not None:
        gen.runtime.barrier()
    return [str(question_file(folder, s)) for s in SPLITS]


def run_pope(args: argparse.Namespace) -> dict:
    from rlalign.evaluation.pope import load_pope, score, split_name

    gen = None
    if args.data == ["shapes"]:
        gen = None if args.predictions else Generator(args)
        args.data = _shapes_pope(args, gen)
    files = [Path(f) for f in args.data]
    names = [split_name(f) for f in files]
    if len(set(names)) != len(names):
        raise RecipeError(f"pope: two data files name the same split ({', '.join(names)})")
    if args.split:
        unknown = sorted(set(args.split) - set(names))
        if unknown:
            raise RecipeError(f"pope: --split {unknown[0]} matches no data file (splits: {', '.join(names)})")
    chosen = [(f, s) for f, s in zip(files, names) if not args.split or s in args.split]
    if args.predictions and len(args.predictions) != len(files):
        raise RecipeError(f"pope: {len(args.predictions)} predictions files for {len(files)} data files")
    preds = dict(zip(files, map(Path, args.predictions or [])))
    # every file is read and checked before the model loads
    sets = {split: (path, _limited(load_pope(path), args.limit)) for path, split in chosen}
    gen = gen or (None if args.predictions else Generator(args))
    result: dict[str, Any] = {
        "benchmark": "pope",
        "model": args.model or "predictions",
        "world_size": gen.world_size if gen else 1,
        "splits": {},
    }
    outputs = {}
    for split, (path, ds) in sets.items():
        qids, questions, labels = ds["question_id"], ds["text"], ds["label"]
        if gen is None:
            found = read_predictions(preds[path], "question_id", ("answer", "text"))
            answers = _match(preds[path], found, qids, "question_id")
        else:
            reader = ImageReader(max_pixels=args.max_image_pixels, root=Path(args.images or path.parent))
            answers = gen(
                len(ds), _pope_item(ds, path, reader, args.prompt_suffix), args.max_new_tokens or 16
            )
        result["splits"][split] = {"file": str(path), **score(answers, labels).metrics()}
        outputs[split] = [
            {"question_id": q, "image": im, "question": t, "label": lab, "answer": a}
            for q, im, t, lab, a in zip(qids, ds["image"], questions, labels, answers)
        ]
    if gen is not None and not gen.done():
        return result
    for split, rows in outputs.items():
        _write(Path(args.out) / f"pope-{split}-predictions.jsonl", _jsonl(rows))
    cols = ["accuracy", "precision", "recall", "f1", "yes_ratio", "n", "tp", "fp", "tn", "fn"]
    table = markdown_table(
        ["split", *cols], [[s, *(m[c] for c in cols)] for s, m in result["splits"].items()]
    )
    _report(Path(args.out), "pope", result, table)
    return result


def pope_figures(
    model_dir: str | Path, data: list[str], out: Path, extra: tuple[str, ...] = ()
) -> dict[str, float]:
    """POPE of a model through `rlalign eval pope` (the path real POPE files take): F1 per split, and accuracy
    and yes-ratio averaged over the splits. `data`: question files, or `shapes`."""
    main_eval(
        [
            "pope",
            str(model_dir),
            *data,
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
            "--batch-size",
            "64",
            *extra,
        ]
    )
    splits = json.loads((out / "pope.json").read_text())["splits"]
    metrics = {f"pope_f1/{name}": m["f1"] for name, m in splits.items()}
    metrics["pope_accuracy"] = sum(m["accuracy"] for m in splits.values()) / len(splits)
    metrics["pope_yes_ratio"] = sum(m["yes_ratio"] for m in splits.values()) / len(splits)
    return metrics


# -- chair and captions ---------------------------------------------------------------------------
def caption_rows(spec: str, split: str, limit: int | None) -> tuple[Any, Any]:
    """(DataConfig, CaptionRows) of `shapes`, a recipe YAML's data section, or a local dataset (a folder's
    `split`, or one file)."""
    from rlalign.config import read_recipe as load_recipe
    from rlalign.config.schema import DataConfig
    from rlalign.data.captions import load_rows

    if spec == "shapes":
        cfg = DataConfig() if limit is None else DataConfig(**{f"{split}_size": limit})
    elif spec.endswith((".yaml", ".yml")):
        cfg = load_recipe(spec).data
    else:
        if not Path(spec).expanduser().exists():
            raise FileNotFoundError(f"{spec}: no such dataset file or folder")
        cfg = DataConfig(source="local", path=spec)
        if Path(spec).expanduser().is_file():  # one file is the evaluated set, whatever --split says
            split = "train"
    return cfg, load_rows(cfg, split)


def _captions(
    args: argparse.Namespace, gen: Generator | None, cfg: Any, rows: Any, ids: list[str]
) -> list[str]:
    """Captions of the first len(ids) rows: generated, or read from the --predictions file."""
    if gen is None:
        if len(args.predictions) != 1:
            raise RecipeError(f"{args.benchmark}: one predictions file expected, got {len(args.predictions)}")
        path = Path(args.predictions[0])
        return _match(path, read_predictions(path, "image_id", ("caption", "text")), ids, "image_id")
    prompt = cfg.prompt if args.prompt is None else args.prompt
    max_new = args.max_new_tokens or cfg.max_response_tokens
    return gen(len(ids), lambda i: (rows.row(i)["image"], prompt), max_new)


def _truths(args: argparse.Namespace, rows: Any, n: int, vocab: Any) -> list[set[str]]:
    """Each image's ground-truth objects: the shapes world's exactly, else the `objects` column mapped
    through the synonym list plus, as CHAIR does, the objects its reference captions mention."""
    from rlalign.evaluation.chair import shapes_truth

    table = rows.table
    if "objects" not in table.column_names:
        raise BadRowError(
            f"{rows.where}: chair needs an 'objects' column (columns: {', '.join(table.column_names)})"
        )
    truths = []
    for k in range(n):
        i = rows.kept[k]
        objects = table[i]["objects"] or []
        if objects and isinstance(objects[0], dict):
            truths.append(shapes_truth(objects))
            continue
        truth = set()
        for name in objects:
            obj = vocab.canonical(name) if isinstance(name, str) else None
            if obj is None:
                raise BadRowError(
                    f"{rows.where} row {i}, column 'objects': {name!r} is not in the synonym list"
                )
            truth.add(obj)
        if not args.no_caption_objects:
            truth |= {m.obj for cap in rows.captions[k] for m in vocab.mentions(cap)}
        truths.append(truth)
    return truths


def run_chair(args: argparse.Namespace) -> dict:
    from rlalign.evaluation.chair import ObjectVocabulary, chair, shapes_vocabulary

    cfg, rows = caption_rows(_one_data(args), args.split, args.limit)
    vocab = ObjectVocabulary.from_file(Path(args.synonyms)) if args.synonyms else None
    if vocab is None and cfg.source != "shapes":
        raise RecipeError("chair: --synonyms FILE is needed outside the shapes world (CHAIR's synonym list)")
    vocab = vocab or shapes_vocabulary()
    n = len(rows) if args.limit is None else min(args.limit, len(rows))
    ids = [rows.table[rows.kept[k]]["image_id"] for k in range(n)]
    truths = _truths(args, rows, n, vocab)
    gen = None if args.predictions else Generator(args)
    captions = _captions(args, gen, cfg, rows, ids)
    res = chair(captions, truths, vocab)
    result = {
        "benchmark": "chair",
        "model": args.model or "predictions",
        "world_size": gen.world_size if gen else 1,
        "data": rows.where,
        **res.metrics(),
    }
    if gen is not None and not gen.done():
        return result
    preds = [
        {"image_id": i, "caption": c, "objects": sorted(t), **d}
        for i, c, t, d in zip(ids, captions, truths, res.per_caption)
    ]
    _write(Path(args.out) / "chair-predictions.jsonl", _jsonl(preds))
    cols = ["chair_i", "chair_s", "captions", "mentions", "hallucinated_mentions", "hallucinated_captions"]
    _report(Path(args.out), "chair", result, markdown_table(cols, [[result[c] for c in cols]]))
    return result


def run_captions(args: argparse.Namespace) -> dict:
    import numpy as np

    from rlalign.evaluation.captions import caption_metrics, grounding

    cfg, rows = caption_rows(_one_data(args), args.split, args.limit)
    n = len(rows) if args.limit is None else min(args.limit, len(rows))
    ids = [rows.table[rows.kept[k]]["image_id"] for k in range(n)]
    refs = rows.captions[:n]
    gen = None if args.predictions else Generator(args)
    captions = _captions(args, gen, cfg, rows, ids)
    metrics = caption_metrics(captions, ids, refs)
    if "objects" in rows.table.column_names and cfg.source == "shapes":
        objects = [rows.table[rows.kept[k]]["objects"] for k in range(n)]
        metrics.update(grounding(captions, objects))
        shift = np.roll(np.arange(n), 1)  # image i gets the first reference of image i-1: the chance level
        metrics.update({f"chance/{k}": v for k, v in grounding([refs[j][0] for j in shift], objects).items()})
    result = {
        "benchmark": "captions",
        "model": args.model or "predictions",
        "world_size": gen.world_size if gen else 1,
        "data": rows.where,
        "n": n,
        **metrics,
    }
    if gen is not None and not gen.done():
        return result
    preds = [{"image_id": i, "caption": c, "refs": r} for i, c, r in zip(ids, captions, refs)]
    _write(Path(args.out) / "captions-predictions.jsonl", _jsonl(preds))
    _report(Path(args.out), "captions", result, markdown_table(["metric", "value"], list(metrics.items())))
    return result


def _one_data(args: argparse.Namespace) -> str:
    if len(args.data) != 1:
        raise RecipeError(
            f"{args.benchmark}: one dataset expected, got {len(args.data)}: {' '.join(args.data)}"
        )
    return args.data[0]


# -- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlalign eval", description="Hallucination and caption benchmarks.")
    sub = p.add_subparsers(dest="benchmark", required=True)
    helps = {
        "pope": "POPE yes/no object questions (accuracy, precision, recall, F1, yes ratio per split)",
        "chair": "CHAIR-i / CHAIR-s of generated captions",
        "captions": "CIDEr-D and BLEU-4 of generated captions",
    }
    for name, text in helps.items():
        usage = (
            f"rlalign eval {name} MODEL DATA... --out OUT [options] | DATA... --predictions FILE... --out OUT"
        )
        b = sub.add_parser(name, help=text, description=text, usage=usage)
        b.add_argument(
            "paths",
            nargs="+",
            metavar="PATH",
            help="model folder, then data (no model with --predictions)",
        )
        b.add_argument("--out", required=True, help="folder for <benchmark>.json, .md and the predictions")
        b.add_argument(
            "--predictions", nargs="+", default=None, help="score these predictions files instead of a model"
        )
        b.add_argument("--limit", type=int, default=None, help="first N questions per split (pope) or images")
        b.add_argument("--batch-size", type=int, default=16)
        b.add_argument(
            "--max-new-tokens", type=int, default=None, help="default: 16 (pope), data's max_response_tokens"
        )
        b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        b.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
        if name == "pope":
            b.add_argument(
                "--split", nargs="+", default=None, help="only these splits (random popular adversarial)"
            )
            b.add_argument(
                "--images", default=None, help="image folder (default: each question file's folder)"
            )
            b.add_argument("--prompt-suffix", default="", help="appended to each question")
            b.add_argument("--shapes-images", type=int, default=100, help="DATA `shapes`: images asked about")
        else:
            b.add_argument("--split", default="test", choices=["train", "val", "test"], help="dataset split")
            b.add_argument("--prompt", default=None, help="text after the image (default: the data's prompt)")
        if name == "chair":
            b.add_argument(
                "--synonyms", default=None, help="CHAIR synonym file (default: the shapes world's objects)"
            )
            b.add_argument(
                "--no-caption-objects",
                action="store_true",
                help="ground truth from the objects column only, not from the references too",
            )
    return p


RUNNERS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "pope": run_pope,
    "chair": run_chair,
    "captions": run_captions,
}


def main_eval(argv: list[str]) -> int:
    """`rlalign eval ...` (see the module docstring); user errors raise RecipeError / FileNotFoundError."""
    args = build_parser().parse_args(argv)
    if args.predictions:
        args.model, args.data = None, args.paths
    else:
        if len(args.paths) < 2:
            raise RecipeError(f"eval {args.benchmark}: expected MODEL DATA..., got {' '.join(args.paths)}")
        args.model, args.data = args.paths[0], args.paths[1:]
    if args.limit is not None and args.limit < 1:
        raise RecipeError(f"eval {args.benchmark}: --limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise RecipeError(f"eval {args.benchmark}: --batch-size must be >= 1, got {args.batch_size}")
    RUNNERS[args.benchmark](args)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    try:
        sys.exit(main_eval(sys.argv[1:]))
    except (RecipeError, FileNotFoundError) as err:
        sys.exit(f"error: {' '.join(str(err).split())}")
