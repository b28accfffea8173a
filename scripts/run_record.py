"""Reading a run record (roles/deploy_run: /var/lib/djm/<project>/runs/<run id>.json on the first db host)."""

from __future__ import annotations

import datetime
from typing import Any


def parse_stamp(stamp: str) -> datetime.datetime:
    """A record's UTC stamp (2026-12-02T03:04:05Z) as an aware datetime."""
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def stage_windows(record: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Epoch seconds (start, end) of each stage of a run that has both stamps, in the record's order."""
    return {
        name: (parse_stamp(times["started"]).timestamp(), parse_stamp(times["finished"]).timestamp())
        for name, times in record.get("stages", {}).items()
        if "started" in times and "finished" in times
    }


def stage_seconds(record: dict[str, Any]) -> dict[str, float]:
    """Seconds spent in each stage of a run, from the start/end stamps of its record (0.1 s)."""
    return {name: round(end - start, 1) for name, (start, end) in stage_windows(record).items()}
