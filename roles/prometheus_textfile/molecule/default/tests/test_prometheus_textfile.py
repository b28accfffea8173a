"""The files converge.yml wrote with the role, as side_effect.yml left them (refusals, check mode).

Both textfile directories are read once per host, in one remote call (every entry's type, mode,
owner, link count and content); promtool runs on the controller on each file's content.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

DEFAULT_DIR = "/var/lib/prometheus/node-exporter"
OTHER_DIR = "/srv/molecule/textfile"

# Run by the host's python3: every path under the directories given, with type, mode, owner,
# link count and content.
SNAPSHOT = r"""
import json, os, pwd, grp, stat, sys
out = {}
for root in sys.argv[1:]:
    for base, dirs, files in os.walk(root):
        for name in [""] + dirs + files:
            path = os.path.join(base, name) if name else base
            st = os.lstat(path)
            entry = {"dir": stat.S_ISDIR(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "nlink": st.st_nlink,
                     "user": pwd.getpwuid(st.st_uid).pw_name, "group": grp.getgrgid(st.st_gid).gr_name}
            if stat.S_ISREG(st.st_mode):
                with open(path, encoding="utf-8") as handle:
                    entry["content"] = handle.read()
            out[path] = entry
print(json.dumps(out))
"""

JOBS = """\
# HELP molecule_jobs_total Jobs run, by queue
# TYPE molecule_jobs_total counter
molecule_jobs_total{queue="default"} 42
molecule_jobs_total{queue="high"} 7
# HELP molecule_queue_depth Queue depth\\nper queue, a \\\\ backslash
# TYPE molecule_queue_depth gauge
molecule_queue_depth{host="HOST",queue="default"} 0.25
molecule_queue_depth{host="HOST",queue="high"} 3
# HELP molecule_odd_label_info A label value to escape
# TYPE molecule_odd_label_info gauge
molecule_odd_label_info{path="C:\\\\dir \\"quoted\\"\\nnext line"} 1
# HELP molecule_up molecule_up
# TYPE molecule_up untyped
molecule_up 1
"""

UPDATED = """\
# HELP molecule_last_success_timestamp_seconds When the job last succeeded
# TYPE molecule_last_success_timestamp_seconds gauge
molecule_last_success_timestamp_seconds{project="shop"} 1764547200
"""

STALE = UPDATED.replace("1764547200", "1700000000")


@cache
def tree(host: Any) -> dict[str, dict[str, Any]]:
    cmd = host.run("python3 -c %s %s %s", SNAPSHOT, "/var/lib/prometheus", "/srv/molecule")
    assert cmd.rc == 0, cmd.stderr
    return json.loads(cmd.stdout)


def files(host: Any) -> dict[str, str]:
    """The files the role wrote, by path."""
    names = (f"{DEFAULT_DIR}/molecule_jobs.prom", f"{DEFAULT_DIR}/molecule_role.prom", f"{OTHER_DIR}/molecule_update.prom")
    return {path: tree(host)[path]["content"] for path in names}


def test_the_files_hold_what_was_given_escaped(host: Any) -> None:
    written = files(host)
    assert written[f"{DEFAULT_DIR}/molecule_jobs.prom"] == JOBS.replace("HOST", host.backend.get_hostname())
    # The update replaced the stale value; the refusals and the check-mode run of side_effect.yml left both as they were.
    assert written[f"{OTHER_DIR}/molecule_update.prom"] == UPDATED


def test_the_role_was_loaded_from_where_this_run_asked(host: Any) -> None:
    """DJM_ROLE_PREFIX=djm.fleet.: the installed collection (DJM_COLLECTION_DIR), else this repository's role."""
    role = tree(host)[f"{DEFAULT_DIR}/molecule_role.prom"]["content"].splitlines()[-1]
    assert role.startswith('molecule_role_info{role_path="') and role.endswith('"} 1'), role
    path = role.split('"')[1]
    if os.environ.get("DJM_ROLE_PREFIX"):
        assert os.environ["DJM_ROLE_PREFIX"] == "djm.fleet."
        assert path == str(Path(os.environ["DJM_COLLECTION_DIR"]) / "roles" / "prometheus_textfile"), path
        assert "/ansible_collections/djm/fleet/roles/" in path
    else:
        assert path == str(Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]).resolve()), path


def test_modes_and_owner_are_the_documented_ones(host: Any) -> None:
    entries = tree(host)
    for path in files(host):
        assert (entries[path]["mode"], entries[path]["user"], entries[path]["group"]) == (0o644, "root", "root"), path
    # The directory and its missing parent were created 0755 (the collector runs as its own user).
    for path in ("/var/lib/prometheus", DEFAULT_DIR):
        assert entries[path]["dir"] and entries[path]["mode"] == 0o755, (path, oct(entries[path]["mode"]))


def test_the_update_was_a_rename_and_left_no_temporary_file(host: Any) -> None:
    entries = tree(host)
    # prepare.yml hard-linked the stale file: a write in place would show through the link.
    assert entries["/srv/molecule/stale-hardlink.prom"]["content"] == STALE
    assert entries[f"{OTHER_DIR}/molecule_update.prom"]["nlink"] == 1
    # Nothing but the files written (and another writer's, untouched): no temporary file, no refused file.
    listed = {p.rsplit("/", 1)[-1] for p in entries if p.startswith((DEFAULT_DIR + "/", OTHER_DIR + "/"))}
    assert listed == {"molecule_jobs.prom", "molecule_role.prom", "molecule_update.prom", "other_writer.prom"}
    other = entries[f"{OTHER_DIR}/other_writer.prom"]
    assert other["mode"] == 0o640 and other["content"].endswith("other_writer_up 1\n")


def promtool() -> str:
    found = shutil.which("promtool") or str(Path(sys.executable).with_name("promtool"))
    assert Path(found).is_file(), "promtool not found: run make setup"
    return found


@pytest.mark.parametrize("name", ["molecule_jobs.prom", "molecule_role.prom", "molecule_update.prom"])
def test_promtool_check_metrics_is_clean(host: Any, name: str) -> None:
    [text] = [content for path, content in files(host).items() if path.endswith("/" + name)]
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr
