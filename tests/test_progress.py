"""Long work without a terminal still reports progress, as plain lines."""

import io
import re

from rich.console import Console

from moekit.progress import progress_bar


def _lines(force_terminal: bool, steps: list[int], total: int) -> list[int]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=force_terminal, width=120)
    with progress_bar("calibrating", total=total, unit="batch", console=console) as advance:
        for n in steps:
            advance(n, "layer 0")
    return [int(m) for m in re.findall(r"^calibrating (\d+)/%d layer 0" % total, out.getvalue(), flags=re.M)]


def test_redirected_output_gets_a_line_every_tenth_of_the_work():
    assert _lines(False, [1] * 20, 20) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert _lines(False, [3] * 7 + [2], 23) == [3, 6, 9, 12, 15, 18, 21, 23]  # every 2; steps of 3 cross one each
    assert _lines(False, [1] * 3, 3) == [1, 2, 3]


def test_a_terminal_gets_only_the_bar():
    assert _lines(True, [1] * 20, 20) == []
