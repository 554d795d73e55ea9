"""`rlalign launch -- accelerate launch ... | torchrun ...`: a launcher that survives preemption cleanly.

torch elastic's agent (under `accelerate launch` and `torchrun`) turns a SIGTERM into an exception: it
forwards the signal to the workers, SIGKILLs them 30 s later (`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`) and exits
1 with a traceback, even when every worker saved its checkpoint and exited 0. A 7B save may need longer,
and a scheduler reading exit 1 takes a clean preemption for a failure.

This wrapper runs the launcher command as a child that does not handle SIGTERM itself (it is started
with SIGTERM ignored and torch elastic told to leave SIGTERM alone), so the signal is meant for the
workers only:

- SIGTERM (or SIGINT) to this process is forwarded to the launcher's workers (its direct children),
  which checkpoint at the end of the current step and exit 0; the launcher then exits 0 as for any
  finished run, and so does this process.
- When a scheduler signals every process of the job at once (SLURM's `--signal`), the launcher ignores
  it and the workers get it directly: the same ending.
- If the workers have not ended `grace` seconds after the signal, the whole process tree is killed and
  the exit status is 128 + SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

import psutil

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 300.0
"""Seconds the workers get to write their checkpoint after a SIGTERM (`RLALIGN_TERM_GRACE`, `--grace`)."""
HANDLED = "SIGINT,SIGHUP,SIGQUIT"
"""The signals torch elastic's agent may still turn into a shutdown: every default one but SIGTERM."""


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _forward(launcher: psutil.Process, sig: int) -> list[int]:
    """Send `sig` to the launcher's direct children (the workers; their own children, such as data
    loader workers, are left to them). Returns the pids signalled."""
    sent = []
    for child in launcher.children(recursive=False):
        try:
            child.send_signal(sig)
            sent.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return sent


def _kill_tree(root: psutil.Process) -> None:
    procs = [root]
    with contextlib.suppress(psutil.NoSuchProcess):
        procs += root.children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def supervise(command: list[str], grace_s: float) -> int:
    """Run `command` (a launcher line) to its end, forwarding SIGTERM to its workers; its exit status."""
    env = dict(os.environ, TORCHELASTIC_SIGNALS_TO_HANDLE=HANDLED, PET_SIGNALS_TO_HANDLE=HANDLED)
    proc = subprocess.Popen(command, env=env, preexec_fn=_ignore_sigterm, start_new_session=True)
    launcher = psutil.Process(proc.pid)
    deadline: list[float] = []  # set once, at the first signal

    def on_signal(signum: int, frame: object) -> None:
        if deadline:
            return
        deadline.append(time.monotonic() + grace_s)
        pids = _forward(launcher, signal.SIGTERM)
        log.warning(
            "%s: forwarded SIGTERM to workers %s; waiting up to %.0f s for their checkpoint",
            signal.Signals(signum).name,
            pids,
            grace_s,
        )

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if deadline and time.monotonic() > deadline[0]:
                    log.error("workers still running %.0f s after SIGTERM: killing the run", grace_s)
                    _kill_tree(launcher)
                    proc.wait()
                    return 128 + signal.SIGKILL
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="rlalign launch",
        description="Run a launcher command (accelerate launch / torchrun); SIGTERM checkpoints and exits 0.",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=float(os.environ.get("RLALIGN_TERM_GRACE", DEFAULT_GRACE_S)),
        help="seconds the workers get to checkpoint after SIGTERM (default: $RLALIGN_TERM_GRACE or 300)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- accelerate launch ... | torchrun ...")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error(
            "give the launcher command after --, e.g. rlalign launch -- accelerate launch -m rlalign.cli train R"
        )
    return supervise(command, args.grace)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
