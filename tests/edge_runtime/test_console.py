"""Progress bars: no redraw thread when the console is not a terminal (a log file), a slow one on a terminal."""

from __future__ import annotations

import io
import threading

from rich.console import Console
from rich.progress import BarColumn, TextColumn

from edge_runtime.console import progress_bar


def _threads_while_running(console: Console) -> int:
    before = threading.active_count()
    with progress_bar(TextColumn("{task.description}"), BarColumn(), console=console) as bar:
        bar.add_task("work", total=3)
        during = threading.active_count()
    return during - before


def test_no_redraw_thread_for_a_log_file() -> None:
    console = Console(file=io.StringIO(), force_terminal=False)
    assert _threads_while_running(console) == 0


def test_a_terminal_gets_a_live_bar_redrawn_once_a_second() -> None:
    console = Console(file=io.StringIO(), force_terminal=True)
    bar = progress_bar(TextColumn("{task.description}"), console=console)
    assert bar.live.auto_refresh and bar.live.refresh_per_second == 1
    assert _threads_while_running(console) == 1
