"""Progress bars that cost next to nothing, so that a bar never takes CPU from training.

rich's default ``Progress`` redraws ten times a second from a thread, also when its console is a log file that shows
no live bar. Measured side by side here: about 8% of a core when writing to a file, against 0.2% without the
automatic redraw (a 2-core machine or a Raspberry Pi gives that time to training instead). So: a live, once-a-second
bar on a terminal, and no redraw thread at all otherwise (callers print a line now and then to a log instead).
"""

from __future__ import annotations

from typing import Any


def progress_bar(*columns: Any, console: Any, **kwargs: Any) -> Any:
    """A ``rich.progress.Progress`` with ``columns`` on ``console``: redrawn once a second on a terminal, never
    automatically elsewhere. Other keyword arguments go to ``Progress``."""
    from rich.progress import Progress

    return Progress(*columns, console=console, auto_refresh=bool(console.is_terminal), refresh_per_second=1, **kwargs)
