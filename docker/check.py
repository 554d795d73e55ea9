"""`make docker-check`: lint docker/Dockerfile and check that its pins are the lock's (constraints.txt).

No Docker engine is needed. Checks: the base image has a pinned tag; every `pip install` of packages runs
under `-c constraints.txt` and any `name==version` it names equals the lock; every package pyproject.toml
depends on (core and the extras the image installs) is pinned in the lock; apt installs skip recommends and
clear their lists; COPY sources exist; the build context's root `.dockerignore` keeps local state out.
Prints one line per problem (file:line: what) and exits 1 if there is any.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEP_OUT = (".venv", "runs", "reports", ".git", "wandb")


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    return pins


def instructions(dockerfile: Path) -> list[tuple[int, str]]:
    """(first line number, instruction text) with backslash continuations joined."""
    out, buf, start = [], "", 0
    for i, line in enumerate(dockerfile.read_text().splitlines(), 1):
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        start = start or i
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            out.append((start, buf.strip()))
            buf, start = "", 0
    return out


def check(root: Path = ROOT) -> list[str]:
    dockerfile, lock_file = root / "docker" / "Dockerfile", root / "constraints.txt"
    where = dockerfile.relative_to(root)
    problems: list[str] = []
    lock = read_lock(lock_file)
    extras: set[str] = set()
    for n, text in instructions(dockerfile):
        op, _, arg = text.partition(" ")
        if op == "FROM" and (":" not in arg or arg.split(":")[-1].split()[0] == "latest"):
            problems.append(f"{where}:{n}: base image without a pinned tag: {arg}")
        if op == "COPY":
            for src in arg.split()[:-1]:
                if not src.startswith("--") and not (root / src).exists():
                    problems.append(f"{where}:{n}: COPY source {src} does not exist")
        if op != "RUN":
            continue
        if "apt-get install" in arg and "--no-install-recommends" not in arg:
            problems.append(f"{where}:{n}: apt-get install without --no-install-recommends")
        if "apt-get install" in arg and "rm -rf /var/lib/apt/lists" not in arg:
            problems.append(f"{where}:{n}: apt lists not removed in the same layer")
        for cmd in re.split(r"&&|;", arg):
            if not re.search(r"\bpip3? install\b", cmd) or "--upgrade pip" in cmd:
                continue
            if "-c constraints.txt" not in cmd:
                problems.append(f"{where}:{n}: pip install without -c constraints.txt: {cmd.strip()}")
            for name, version in re.findall(r"([A-Za-z0-9_.\-]+)==([^\s'\"]+)", cmd):
                if lock.get(_name(name)) != version:
                    problems.append(f"{where}:{n}: {name}=={version} but the lock has {lock.get(_name(name))}")
            extras |= {e.strip() for m in re.findall(r"\.\[([^\]]+)\]", cmd) for e in m.split(",")}
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    needed = list(project["dependencies"])
    for extra in sorted(extras):
        needed += project["optional-dependencies"].get(extra, [])
    for req in needed:
        if _name(req) not in lock:
            problems.append(f"constraints.txt: no pin for {_name(req)} (pyproject.toml needs {req!r})")
    ignore = root / ".dockerignore"
    if not ignore.is_file():
        problems.append(".dockerignore: missing at the build context's root (docker/.dockerignore is not read)")
    else:
        entries = {line.strip().strip("/") for line in ignore.read_text().splitlines()}
        problems += [f".dockerignore: does not keep out {d}" for d in KEEP_OUT if d not in entries]
    return problems


def main() -> int:
    problems = check(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    for p in problems:
        print(p)
    print("docker-check: " + (f"{len(problems)} problem(s)" if problems else "ok"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
