"""The suite writes only where pytest tells it: no test names a fixed temporary folder."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FIXED_TMP = re.compile("/" + "tmp" + r"(/|[\"'\s]|$)")  # a literal path at the root's tmp folder


def test_no_literal_tmp_path_in_tests():
    hits = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if FIXED_TMP.search(line)
    ]
    assert not hits, "use pytest's tmp_path, not a fixed folder:\n" + "\n".join(hits)


def test_the_check_catches_a_fixed_path():
    root_tmp = "/" + "tmp"
    assert FIXED_TMP.search(f'img.save("{root_tmp}/t/a.png")')
    assert FIXED_TMP.search(f"Path('{root_tmp}')")
    assert not FIXED_TMP.search("out = tmp_path / 'tmp'")
