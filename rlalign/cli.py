"""`rlalign train|validate|ls|init|launch|eval|demo|bench|plan|index|pairs`.

Errors a user can fix (a bad recipe, a missing file, a bad data row, a model that cannot be found) print
one line and exit 2; `--debug` (or `RLALIGN_DEBUG=1`) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from rlalign.config import Recipe, RecipeError
from rlalign.config.loader import LAUNCH_DIR, PACKAGE_DIR, RECIPES_DIR, resolve_recipe_path
from rlalign.recipe import load_recipe

BENCHES = {
    "cider": "rlalign.bench.cider",
    "grpo": "rlalign.bench.grpo",
    "dpo": "rlalign.bench.dpo",
    "index": "rlalign.bench.index",
    "logprob": "rlalign.bench.logprob",
    "prefix": "rlalign.bench.prefix",
    "service": "rlalign.bench.service",
}


def _setup_logging(verbose: bool = False) -> None:
    """Rich on a terminal; plain timestamped lines otherwise (job logs, pipes), never wrapped, so a
    long path or a grep for a message survives."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    if sys.stdout.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stdout)  # where the rich console writes too
        prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler])
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


def load_checked(path: str, overrides: list[str], *, validate: bool = False) -> tuple[Recipe, list[str]]:
    """`load_recipe` plus `preflight`: everything knowable before any weights are read, and notes.
    `validate` also checks LoRA targets on the model's skeleton (train checks them on the real model)."""
    from rlalign.preflight import preflight

    recipe = load_recipe(path, overrides)
    try:
        notes = preflight(recipe, model_structure=validate, before_earlier_stages=validate)
    except RecipeError as err:
        raise RecipeError(f"{resolve_recipe_path(path)}: {err}") from None
    return recipe, notes


def cmd_train(args: argparse.Namespace) -> int:
    from rlalign.trainer.loop import train

    recipe, _ = load_checked(args.recipe, args.overrides)
    out = train(recipe)
    logging.getLogger("rlalign").info("run folder: %s", out)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    for path in args.recipes:
        _, notes = load_checked(path, args.overrides, validate=True)
        print(f"ok  {path}" + "".join(f"\n    note: {n}" for n in notes))
    return 0


def _description(path: Path) -> str:
    line = next((x for x in path.read_text().splitlines() if x.startswith("description:")), "")
    return line.removeprefix("description:").strip()


def cmd_ls(args: argparse.Namespace) -> int:
    from rlalign.objectives import OBJECTIVES

    if args.objectives:
        for name in OBJECTIVES.names():
            print(name)
        return 0
    print(f"recipes ({RECIPES_DIR}):")
    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        print(f"  {path.relative_to(RECIPES_DIR)!s:38} {_description(path)}")
    print(f"launch files ({LAUNCH_DIR}):")
    for path in sorted(p for p in LAUNCH_DIR.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(PACKAGE_DIR)!s}")
    return 0


def _shipped_recipe(name: str) -> Path:
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    shipped = ", ".join(str(p.relative_to(RECIPES_DIR)) for p in sorted(RECIPES_DIR.rglob("*.yaml")))
    raise RecipeError(f"init: no shipped recipe '{name}' (shipped: {shipped})")


def _init_files(recipe: Path) -> list[Path]:
    """The shipped files a recipe needs to run as its header says: itself, its `base:` chain, the launch
    files its comment lines name and the DeepSpeed files those name (all relative to the package)."""
    import yaml

    files, todo = [], [recipe]
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.append(path)
        text = path.read_text()
        if path.suffix == ".yaml" and path.is_relative_to(RECIPES_DIR):
            base = (yaml.safe_load(text) or {}).get("base")
            if base:
                todo.append((path.parent / base).resolve())
        for ref in re.findall(r"launch/[\w./-]+\.(?:yaml|json|sh|sbatch)", text):
            if (PACKAGE_DIR / ref).is_file():
                todo.append((PACKAGE_DIR / ref).resolve())
    return files


def cmd_init(args: argparse.Namespace) -> int:
    """Copy a shipped recipe and what it needs into `--dir`, keeping the package layout (`recipes/...`,
    `launch/...`) so the command in its header runs as written from there."""
    dest = Path(args.dir)
    plan = [(src, dest / src.relative_to(PACKAGE_DIR)) for src in _init_files(_shipped_recipe(args.name))]
    clash = [str(d) for _, d in plan if d.exists()] if not args.force else []
    if clash:
        raise RecipeError(f"init: {', '.join(clash)} already exist(s); nothing written (--force overwrites)")
    for src, dst in plan:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        print(f"wrote {dst}")
    header = [
        x.removeprefix("#").strip() for x in plan[0][0].read_text().splitlines()[:4] if x.startswith("#   ")
    ]
    if header:
        print("run it with:\n  " + "\n  ".join(header))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from rlalign.launcher import main as launch_main

    return launch_main(args.rest)


def cmd_eval(args: argparse.Namespace) -> int:
    from rlalign.evaluation.runner import main_eval

    return main_eval(args.rest)


def cmd_demo(args: argparse.Namespace) -> int:
    from rlalign.demo import run_demo

    report = run_demo(Path(args.out), seeds=args.seeds, quick=args.quick, stages=args.stages)
    print(f"report: {report}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rlalign.plan import run

    return run(args.rest)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.name not in BENCHES:
        raise RecipeError(f"unknown benchmark '{args.name}' (valid: {', '.join(sorted(BENCHES))})")
    importlib.import_module(BENCHES[args.name]).run(args.rest)
    return 0


def _pool_vectors(recipe: Recipe):
    """The recipe's image pool embedded (sharded over the launched ranks, resumable): (embedder, vectors,
    report, runtime)."""
    from rlalign.pairs.builder import load_pool
    from rlalign.retrieval.embed_store import Column, embed_pool
    from rlalign.retrieval.embedder import build_embedder
    from rlalign.runtime import Runtime

    runtime = Runtime.for_tools()
    try:
        embedder, _, _ = build_embedder(recipe)
    except OSError as err:
        raise RecipeError(" ".join(str(err).split())) from None
    if recipe.pairs.device == "auto":
        embedder.tower.to(runtime.device)
    vectors, report = embed_pool(embedder, Column(load_pool(recipe), "image"), runtime)
    return embedder, vectors, report, runtime


def cmd_index_build(args: argparse.Namespace) -> int:
    from rlalign.pairs.builder import INDEX_DIR, index_config, indexed_vectors, save_index

    recipe = load_recipe(args.recipe, args.overrides)
    embedder, vectors, report, runtime = _pool_vectors(recipe)
    vectors, fingerprint = indexed_vectors(recipe.pairs, vectors, embedder.fingerprint)  # as `pairs build`
    out = Path(args.out or Path(recipe.pairs.output_dir) / INDEX_DIR)
    if runtime.is_main:
        index = save_index(index_config(recipe.pairs), vectors, fingerprint, out)
        print(
            f"index: {index.count} images, dim {index.dim}, embedded {report.embedded_images} "
            f"({report.images_per_s:.1f} images/s) in {len(report.embedded_shards)} of {report.shards} "
            f"shards, fingerprint {embedder.fingerprint[:16]} -> {out}"
        )
    runtime.barrier()
    return 0


def cmd_index_tune(args: argparse.Namespace) -> int:
    from rlalign.pairs.builder import INDEX_DIR, indexed_vectors
    from rlalign.retrieval.tune import tune, write_report

    recipe = load_recipe(args.recipe, args.overrides)
    embedder, vectors, _, runtime = _pool_vectors(recipe)
    vectors, _ = indexed_vectors(recipe.pairs, vectors, embedder.fingerprint)  # tuned on what is indexed
    if not runtime.is_main:
        return 0
    out = Path(args.out or Path(recipe.pairs.output_dir) / INDEX_DIR)
    try:
        result = tune(vectors, recipe.pairs.index, k=args.k, n_queries=args.queries, reps=args.reps)
    except ValueError as err:
        raise RecipeError(f"index tune: {err}") from None
    files = write_report(result, out)
    chosen = result.chosen
    print(
        f"index tune: {chosen.label()}: recall@{result.k} {chosen.recall:.4f} (target {result.target_recall}), "
        f"{chosen.queries_per_s:.0f} queries/s; table {files['table']}, plot {files['plot']}"
    )
    print("use: " + " ".join(result.overrides()))
    return 0


def cmd_index_serve(args: argparse.Namespace) -> int:
    from rlalign.retrieval.service import main_serve

    return main_serve(args.rest)


def cmd_index_query(args: argparse.Namespace) -> int:
    from rlalign.retrieval.client import main_query

    return main_query(args.rest)


def cmd_pairs_build(args: argparse.Namespace) -> int:
    from rlalign.pairs.builder import build_pairs

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        out = build_pairs(recipe, overwrite=args.overwrite)
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
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors (or RLALIGN_DEBUG=1)")
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
    ls = sub.add_parser("ls", help="list shipped recipes and launch files (or objectives)")
    ls.add_argument("--objectives", action="store_true")
    ls.set_defaults(func=cmd_ls)
    ini = sub.add_parser("init", help="copy a shipped recipe (and the launch files it names) here to edit")
    ini.add_argument("name", help="shipped recipe, e.g. demo/shapes-xe.yaml (see `rlalign ls`)")
    ini.add_argument("--dir", default=".", help="where to write (default: the working directory)")
    ini.add_argument("--force", action="store_true", help="overwrite files that exist")
    ini.set_defaults(func=cmd_init)
    la = sub.add_parser(
        "launch",
        help="run `accelerate launch`/`torchrun` so SIGTERM checkpoints and exits 0",
        add_help=False,
        prefix_chars="+",
    )
    la.add_argument("rest", nargs=argparse.REMAINDER)
    la.set_defaults(func=cmd_launch)
    e = sub.add_parser(
        "eval",
        help="pope | chair | captions benchmarks of a model (`rlalign eval pope --help`)",
        add_help=False,
        prefix_chars="+",
    )
    e.add_argument("rest", nargs=argparse.REMAINDER)
    e.set_defaults(func=cmd_eval)
    d = sub.add_parser("demo", help="the whole chain on the shapes world, on a CPU, with a report")
    d.add_argument("--out", default="reports/demo")
    d.add_argument(
        "--seeds", type=int, default=3, help="seeds of each RL / preference stage (mean ± std in the report)"
    )
    d.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    d.add_argument("--stages", nargs="+", default=None, help="run only these stages (default: all)")
    d.set_defaults(func=cmd_demo)
    ix = sub.add_parser(
        "index", help="image index: build (from a recipe), tune, serve, query"
    ).add_subparsers(dest="index_command", required=True)
    ib = ix.add_parser("build", help="embed the recipe's image pool and save a vector index")
    ib.add_argument("recipe")
    ib.add_argument("overrides", nargs="*", help="a.b.c=value")
    ib.add_argument("--out", default=None, help="index folder (default: pairs.output_dir/index)")
    ib.set_defaults(func=cmd_index_build)
    it = ix.add_parser(
        "tune", help="sweep index settings on held-out pool queries; table + plot beside the index"
    )
    it.add_argument("recipe")
    it.add_argument("overrides", nargs="*", help="a.b.c=value (pairs.index.target_recall sets the target)")
    it.add_argument(
        "--out", default=None, help="where tune.json/.md/.png go (default: pairs.output_dir/index)"
    )
    it.add_argument("--queries", type=int, default=500, help="held-out queries (at most a fifth of the pool)")
    it.add_argument("--k", type=int, default=10)
    it.add_argument("--reps", type=int, default=3, help="timed searches per setting (median)")
    it.set_defaults(func=cmd_index_tune)
    # serve / query parse their own arguments (`rlalign index serve --help`)
    for name, func in (("serve", cmd_index_serve), ("query", cmd_index_query)):
        ip = ix.add_parser(
            name,
            help=f"{name} saved indexes (see `rlalign index {name} --help`)",
            add_help=False,
            prefix_chars="+",
        )
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
    pbb.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: delete this folder's index, shards and dataset first",
    )
    pbb.set_defaults(func=cmd_pairs_build)
    b = sub.add_parser("bench", help="ours against a peer in the same run; ends with one JSON line")
    b.add_argument("name")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    pl = sub.add_parser(
        "plan",
        help="memory per rank for each backend, before launching (`rlalign plan --help`)",
        add_help=False,
    )
    pl.add_argument("rest", nargs=argparse.REMAINDER)
    pl.set_defaults(func=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    debug = args.debug or os.environ.get("RLALIGN_DEBUG", "") not in ("", "0")
    try:
        rc = args.func(args)
    except (RecipeError, FileNotFoundError) as err:
        if debug:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_worker(rc)
    return rc


def _leave_worker(rc: int) -> None:
    """A rank of a distributed run that finished its work leaves without interpreter teardown.

    With gloo, a rank sometimes aborted after its last line ('terminate called without an active
    exception', SIGABRT, in about 1 of 15 two-process runs on a loaded 2-core machine): the faulthandler
    showed the main thread inside interpreter finalization, where a collective's C++ worker thread still
    needed the GIL to free a finished collective's tensors. Destroying the process group first is no
    cure (its destructor joins that thread while holding the GIL: a rank hung so). Everything the run
    writes is written and closed by now (checkpoints, trackers, reports), so the logs and streams are
    flushed and the process exits with the command's own code instead of tearing the interpreter down.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
