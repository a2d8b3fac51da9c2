"""The progress bar of `meshctl run` / `submit --wait`: records/s, MB/s, ETA, on stderr.

rich is used for the bar and the tables: it is well kept, renders correctly on terminals and
degrades to plain lines when stderr is not one, and gives both a progress bar and tables from one
dependency.
"""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class JobProgress:
    """Feed it the job's progress counters; it draws bytes read out of bytes total."""

    def __init__(self, job_id: str, *, enabled: bool = True):
        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[records]} records"), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False, disable=not self.enabled)
        self.task = self.progress.add_task(job_id, total=None, records="0", rate="")

    def __enter__(self) -> "JobProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, counters: dict) -> None:
        total = counters.get("bytes_total") or None
        seconds = counters.get("seconds") or 0.0
        records = int(counters.get("records_in", 0))
        rate = ""
        if seconds > 0:
            rate = f"{records / seconds:,.0f} rec/s {counters.get('bytes_in', 0) / seconds / 1e6:,.1f} MB/s"
        self.progress.update(self.task, total=total, completed=counters.get("bytes_read", 0),
                             records=f"{records:,}", rate=rate)
