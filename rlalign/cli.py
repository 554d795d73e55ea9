"""`rlalign train|validate|ls|eval|demo|bench|index|pairs`.

Errors a user can fix (a bad recipe, a missing file) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from rlalign.config import RecipeError, load_recipe
from rlalign.config.loader import RECIPES_DIR

BENCHES = {
    "cider": "rlalign.bench.cider",
    "grpo": "rlalign.bench.grpo",
    "dpo": "rlalign.bench.dpo",
    "index": "rlalign.bench.index",
}


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(show_path=False, markup=False)]
    )
    for noisy in (
        "httpx",
        "urllib3",
        "DeepSpeed",
        "torch.distributed",
        "accelerate",
        "datasets",
        "transformers",
        "faiss",
        "faiss.loader",
    ):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def cmd_train(args: argparse.Namespace) -> int:
    from rlalign.trainer.loop import train

    recipe = load_recipe(args.recipe, args.overrides)
    out = train(recipe)
    logging.getLogger("rlalign").info("run folder: %s", out)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    for path in args.recipes:
        load_recipe(path, args.overrides)
        print(f"ok  {path}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from rlalign.objectives import OBJECTIVES

    if args.objectives:
        for name in sorted(OBJECTIVES):
            print(name)
        return 0
    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("description:")), "")
        print(f"{path.relative_to(RECIPES_DIR)!s:40} {first.removeprefix('description:').strip()}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rlalign.evaluate import evaluate_captioner

    recipe = load_recipe(args.recipe, args.overrides)
    result = evaluate_captioner(args.model, recipe.data, split=args.split, limit=args.limit)
    for key, value in result.metrics.items():
        print(f"{key:28} {value:.4f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rlalign.demo import run_demo

    report = run_demo(Path(args.out), seeds=args.seeds, quick=args.quick, stages=args.stages)
    print(f"report: {report}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.name not in BENCHES:
        raise RecipeError(f"unknown benchmark '{args.name}' (valid: {', '.join(sorted(BENCHES))})")
    importlib.import_module(BENCHES[args.name]).run(args.rest)
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from rlalign.retrieval.embedder import build_embedder
    from rlalign.retrieval.pairs import INDEX_DIR, build_index, load_pool

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        embedder, _, _ = build_embedder(recipe)
    except OSError as err:
        raise RecipeError(" ".join(str(err).split())) from None
    out = Path(args.out or Path(recipe.pairs.output_dir) / INDEX_DIR)
    index = build_index(recipe.pairs, embedder, load_pool(recipe)["image"], out)
    print(f"index: {index.count} images, dim {index.dim}, embedded {embedder.embedded} "
          f"(cached {embedder.cache_hits}), fingerprint {embedder.fingerprint[:16]} -> {out}")  # fmt: skip
    return 0


def cmd_index_serve(args: argparse.Namespace) -> int:
    from rlalign.retrieval.service import main_serve

    return main_serve(args.rest)


def cmd_index_query(args: argparse.Namespace) -> int:
    from rlalign.retrieval.client import main_query

    return main_query(args.rest)


def cmd_pairs_build(args: argparse.Namespace) -> int:
    from rlalign.retrieval.pairs import build_pairs

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        out = build_pairs(recipe)
    except OSError as err:
        raise RecipeError(" ".join(str(err).split())) from None
    if out.is_file():
        print(f"pairs: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlalign", description="Align vision-language models with RL and preferences."
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", help="train a recipe (launch with `accelerate launch -m rlalign.cli train ...`)"
    )
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="a.b.c=value")
    t.set_defaults(func=cmd_train)
    v = sub.add_parser("validate", help="check recipes without loading any model")
    v.add_argument("recipes", nargs="+")
    v.add_argument("--set", dest="overrides", action="append", default=[], help="a.b.c=value")
    v.set_defaults(func=cmd_validate)
    ls = sub.add_parser("ls", help="list shipped recipes (or objectives)")
    ls.add_argument("--objectives", action="store_true")
    ls.set_defaults(func=cmd_ls)
    e = sub.add_parser("eval", help="caption metrics of a saved model on a split")
    e.add_argument("recipe")
    e.add_argument("--model", required=True, help="folder written by train (run/final)")
    e.add_argument("--split", default="test")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("overrides", nargs="*")
    e.set_defaults(func=cmd_eval)
    d = sub.add_parser("demo", help="the whole chain on the shapes world, on a CPU, with a report")
    d.add_argument("--out", default="reports/demo")
    d.add_argument("--seeds", type=int, default=1)
    d.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    d.add_argument("--stages", nargs="+", default=None, help="run only these stages (default: all)")
    d.set_defaults(func=cmd_demo)
    ix = sub.add_parser("index", help="image index: build (from a recipe), serve, query").add_subparsers(
        dest="index_command", required=True
    )
    ib = ix.add_parser("build", help="embed the recipe's image pool and save a vector index")
    ib.add_argument("recipe")
    ib.add_argument("overrides", nargs="*", help="a.b.c=value")
    ib.add_argument("--out", default=None, help="index folder (default: pairs.output_dir/index)")
    ib.set_defaults(func=cmd_index_build)
    # serve / query parse their own arguments (`rlalign index serve --help`)
    for name, func in (("serve", cmd_index_serve), ("query", cmd_index_query)):
        ip = ix.add_parser(name, help=f"{name} saved indexes (see `rlalign index {name} --help`)", add_help=False,
                           prefix_chars="+")  # fmt: skip
        ip.add_argument("rest", nargs=argparse.REMAINDER)
        ip.set_defaults(func=func)
    pb = sub.add_parser("pairs", help="RE-ALIGN preference pairs").add_subparsers(
        dest="pairs_command", required=True
    )
    pbb = pb.add_parser(
        "build", help="write the recipe's preference dataset (launch with `accelerate launch`)"
    )
    pbb.add_argument("recipe")
    pbb.add_argument("overrides", nargs="*", help="a.b.c=value")
    pbb.set_defaults(func=cmd_pairs_build)
    b = sub.add_parser("bench", help="ours against a peer in the same run; ends with one JSON line")
    b.add_argument("name")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (RecipeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
