"""Reading a run record (roles/deploy_run: /var/lib/djm/<project>/runs/<run id>.json on the first db host)."""

from __future__ import annotations

import datetime
from typing import Any


def stage_seconds(record: dict[str, Any]) -> dict[str, float]:
    """Seconds spent in each stage of a run, from the start/end stamps of its record (0.1 s)."""

    def parse(stamp: str) -> datetime.datetime:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))

    return {
        name: round((parse(times["finished"]) - parse(times["started"])).total_seconds(), 1)
        for name, times in record.get("stages", {}).items()
        if "started" in times and "finished" in times
    }
