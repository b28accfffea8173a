"""roles/deploy_run/library/deploy_run.py as a real Ansible module, against a state dir in tmp_path.

Each call runs the module file in its own Python process with an args file (ansible-core's way of
invoking a module directly: ``python module.py args.json``), so the lock is taken by separate
processes as it is on a host; one test goes through ``ansible localhost -m deploy_run -M ...``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LIBRARY = REPO / "roles" / "deploy_run" / "library"
MODULE = LIBRARY / "deploy_run.py"
PROJECT = "shop"


class State:
    """The state dir of one test and a way to call the module on it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.dir = tmp_path / "state"
        self.root = self.dir / PROJECT
        self.calls = 0

    def call(self, action: str, run_id: str = "", check: bool = False, project: str = PROJECT, **params: Any) -> dict[str, Any]:
        self.calls += 1
        args = {"action": action, "state_dir": str(self.dir), "project": project, "run_id": run_id, **params}
        args_file = self.tmp / f"args-{self.calls}.json"
        args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {**args, "_ansible_check_mode": check}}))
        proc = subprocess.run(
            [sys.executable, str(MODULE), str(args_file)], capture_output=True, text=True, timeout=60, check=False
        )
        try:
            result = json.loads(proc.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"module printed no JSON (rc {proc.returncode}): {proc.stdout}{proc.stderr}")
        assert (proc.returncode != 0) == bool(result.get("failed")), proc.stdout + proc.stderr
        return result

    def ok(self, action: str, run_id: str = "", **params: Any) -> dict[str, Any]:
        result = self.call(action, run_id, **params)
        assert not result.get("failed"), result
        return result

    def json(self, name: str) -> Any:
        return json.loads((self.root / name).read_text())

    def history(self) -> list[dict[str, Any]]:
        path = self.root / "history.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def snapshot(self) -> dict[str, tuple[int, bytes | None]]:
        """Every path under the state dir with its mode and content: equal snapshots, nothing written."""
        if not self.dir.exists():
            return {}
        return {
            str(p.relative_to(self.dir)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in sorted(self.dir.rglob("*"))
        }


@pytest.fixture
def state(tmp_path: Path) -> State:
    return State(tmp_path)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------------- lock


def test_lock_is_taken_once_and_refused_to_another_run_naming_its_holder(state: State) -> None:
    holder = {"owner": "alice", "controller": "ctl1", "pid": 4242, "playbook": "migrate", "target": "v2"}
    taken = state.ok("lock", "run-a", data=holder)
    assert taken["changed"] is True and taken["broken"] is None
    on_disk = state.json("lock.json")
    assert on_disk == taken["lock"]
    assert on_disk == {**holder, "run_id": "run-a", "locked_at": on_disk["locked_at"]}
    assert time.strptime(on_disk["locked_at"], "%Y-%m-%dT%H:%M:%SZ")
    before = (state.root / "lock.json").read_bytes()

    refused = state.call("lock", "run-b", data={"owner": "bob"})
    assert refused["failed"] is True and refused["held"] is True
    assert refused["lock"] == on_disk
    assert "held" in refused["msg"]
    assert (state.root / "lock.json").read_bytes() == before


def test_relock_by_the_holder_is_unchanged_and_keeps_its_data(state: State) -> None:
    state.ok("lock", "run-a", data={"owner": "alice"})
    before = (state.root / "lock.json").read_bytes()
    again = state.ok("lock", "run-a", data={"owner": "someone-else"})
    assert again["changed"] is False
    assert again["lock"]["owner"] == "alice"
    assert (state.root / "lock.json").read_bytes() == before


def test_concurrent_lockers_one_wins_the_others_are_refused(state: State) -> None:
    """Lockers and readers at once, several rounds: one locker wins, the others are refused as held, and no
    call ever reads a lock file without its content (state.call fails on a module that prints no JSON: an
    O_EXCL create then a write let 6 of 480 such calls crash with a traceback on a loaded machine)."""
    state.ok("read")  # the module never creates anything on read
    assert not state.dir.exists()
    for round_ in range(4):
        calls = [("lock" if n % 2 == 0 else "read", f"run-{round_}-{n}") for n in range(8)]
        with ThreadPoolExecutor(len(calls)) as pool:
            results = list(pool.map(lambda call: (call[0], state.call(call[0], call[1], data={"owner": call[1]})), calls))
        locks = [result for action, result in results if action == "lock"]
        winners = [r for r in locks if not r.get("failed")]
        assert len(winners) == 1, locks
        holder = state.json("lock.json")
        assert holder["run_id"] == winners[0]["lock"]["run_id"]
        for loser in (r for r in locks if r.get("failed")):
            assert loser.get("held") is True, loser
        for _, read in (item for item in results if item[0] == "read"):
            assert read["lock"] in (None, holder), read
        state.ok("unlock", holder["run_id"])


@pytest.mark.parametrize(
    ("name", "actions"), [("lock.json", ("read", "lock", "update")), ("runs/run-a.json", ("read", "update"))]
)
def test_a_state_file_damaged_from_outside_is_named_in_one_line_and_left_alone(
    state: State, name: str, actions: tuple[str, ...]
) -> None:
    state.ok("lock", "run-a", data={"owner": "alice"})
    state.ok("start", "run-a", data={"release": "v2"})
    damaged = state.root / name
    damaged.write_text('{"run_id": "run-a", "own')  # cut short: a disk that filled, an editor
    for action in actions:  # those that read it
        result = state.call(action, "run-a", data={})
        assert result.get("failed") and "\n" not in result["msg"], result
        assert f"{damaged} is not JSON" in result["msg"] and "changed outside deploy_run" in result["msg"], result
    assert damaged.read_text() == '{"run_id": "run-a", "own'


def test_force_breaks_a_lock_and_reports_the_broken_holder(state: State) -> None:
    state.ok("lock", "run-a", data={"owner": "alice", "pid": 1})
    broke = state.ok("lock", "run-b", data={"owner": "bob"}, force=True)
    assert broke["changed"] is True
    assert broke["broken"]["run_id"] == "run-a" and broke["broken"]["owner"] == "alice"
    assert state.json("lock.json")["run_id"] == "run-b"
    assert mode(state.root / "lock.json") == 0o640


def test_unlock_by_another_run_fails_and_by_the_holder_releases(state: State) -> None:
    assert state.ok("unlock", "run-a") == {**state.ok("unlock", "run-a"), "changed": False, "lock": None}
    state.ok("lock", "run-a")
    wrong = state.call("unlock", "run-b")
    assert wrong["failed"] is True and "held by run run-a, not run-b" in wrong["msg"]
    assert (state.root / "lock.json").exists()
    released = state.ok("unlock", "run-a")
    assert released["changed"] is True and released["released"]["run_id"] == "run-a"
    assert not (state.root / "lock.json").exists()
    assert state.ok("unlock", "run-a")["changed"] is False


def test_forced_unlock_removes_another_runs_lock(state: State) -> None:
    state.ok("lock", "run-a")
    assert state.ok("unlock", "run-b", force=True)["released"]["run_id"] == "run-a"
    assert not (state.root / "lock.json").exists()


# ------------------------------------------------------------------------------------------ records


def test_start_creates_the_record_the_last_run_pointer_with_private_modes(state: State) -> None:
    started = state.ok("start", "run-1", stage="prepare", data={"playbook": "migrate", "to_release": "v2"})
    assert started["changed"] is True
    record = state.json("runs/run-1.json")
    assert record == started["run"]
    assert record["run_id"] == "run-1" and record["playbook"] == "migrate" and record["to_release"] == "v2"
    assert record["stage"] == "prepare" and set(record["stages"]["prepare"]) == {"started"}
    assert (state.root / "last-run").read_text() == "run-1\n"
    assert state.ok("read")["last_run"] == record
    assert mode(state.root) == 0o750 and mode(state.root / "runs") == 0o750
    assert mode(state.root / "runs" / "run-1.json") == 0o640 and mode(state.root / "last-run") == 0o640


def test_start_again_with_the_same_data_is_unchanged(state: State) -> None:
    state.ok("start", "run-1", stage="prepare", data={"to_release": "v2"})
    before = state.snapshot()
    again = state.ok("start", "run-1", stage="prepare", data={"to_release": "v2"})
    assert again["changed"] is False
    assert state.snapshot() == before


def test_start_of_an_earlier_run_moves_the_last_run_pointer_and_says_so(state: State) -> None:
    state.ok("start", "run-1", data={"to_release": "v2"})
    state.ok("start", "run-2", data={"to_release": "v3"})
    assert (state.root / "last-run").read_text() == "run-2\n"
    again = state.ok("start", "run-1", data={"to_release": "v2"})
    assert again["changed"] is True
    assert (state.root / "last-run").read_text() == "run-1\n"


def test_update_merges_top_level_fields_and_stages_per_stage(state: State) -> None:
    state.ok("start", "run-1", data={"switched": [], "maintenance": {"opened": "t1"}})
    state.ok("update", "run-1", data={"switched": ["app1"], "stages": {"backup": {"bytes": 10}}})
    merged = state.ok(
        "update", "run-1", data={"maintenance": {"closed": "t2"}, "stages": {"backup": {"files": 3}, "migrate": {"n": 1}}}
    )
    record = state.json("runs/run-1.json")
    assert record == merged["run"]
    assert record["switched"] == ["app1"]
    assert record["maintenance"] == {"closed": "t2"}  # top-level fields are replaced, not merged
    assert record["stages"] == {"backup": {"bytes": 10, "files": 3}, "migrate": {"n": 1}}
    assert state.ok("update", "run-1", data={"stages": {"backup": {"files": 3}}})["changed"] is False


def test_stage_switch_closes_the_previous_stage(state: State) -> None:
    state.ok("start", "run-1", stage="prepare")
    state.ok("update", "run-1", stage="backup", data={"stages": {"backup": {"id": "pre-v2"}}})
    record = state.json("runs/run-1.json")
    assert record["stage"] == "backup"
    assert set(record["stages"]["prepare"]) == {"started", "finished"}
    assert record["stages"]["prepare"]["finished"] >= record["stages"]["prepare"]["started"]
    assert record["stages"]["backup"] == {"id": "pre-v2", "started": record["stages"]["backup"]["started"]}
    # The same stage again: nothing moves.
    assert state.ok("update", "run-1", stage="backup")["changed"] is False


def test_a_stage_entered_again_is_open_again(state: State) -> None:
    state.ok("start", "run-1", stage="converge")
    state.ok("update", "run-1", stage="finish")
    time.sleep(1.1)  # stamps have a one-second resolution
    state.ok("update", "run-1", stage="converge")
    stages = state.json("runs/run-1.json")["stages"]
    assert "finished" not in stages["converge"]
    assert stages["converge"]["started"] >= stages["finish"]["finished"]


def test_update_or_finish_of_a_run_without_record_is_refused(state: State) -> None:
    for action in ("update", "finish"):
        result = state.call(action, "ghost", stage="x")
        assert result["failed"] is True and "has no record" in result["msg"]
    assert not (state.root / "runs" / "ghost.json").exists()


# ------------------------------------------------------------------------------------------- finish


def test_finish_records_the_result_appends_history_once_and_releases_the_lock(state: State) -> None:
    state.ok("lock", "run-1", data={"owner": "alice"})
    state.ok("start", "run-1", stage="prepare", data={"to_release": "v2"})
    state.ok("update", "run-1", stage="migrate")
    done = state.ok("finish", "run-1", stage="finish", data={"result": "succeeded"})
    assert done["changed"] is True and done["released"]["run_id"] == "run-1"
    assert not (state.root / "lock.json").exists()
    record = state.json("runs/run-1.json")
    assert record["result"] == "succeeded" and "finished" in record
    assert record["stage"] == "finish"
    assert all(set(fields) == {"started", "finished"} for fields in record["stages"].values())
    assert state.history() == [record]
    assert mode(state.root / "history.jsonl") == 0o640

    before = state.snapshot()
    again = state.ok("finish", "run-1", stage="finish", data={"result": "succeeded"})
    assert again["changed"] is False and again["released"] is None
    assert state.snapshot() == before
    assert len(state.history()) == 1


def test_finish_again_with_new_data_appends_the_new_record(state: State) -> None:
    state.ok("start", "run-1", stage="migrate")
    first = state.ok("finish", "run-1", stage="finish", data={"result": "failed"})["run"]
    second = state.ok("finish", "run-1", stage="rolled-back", data={"result": "rolled_back"})
    assert second["changed"] is True
    record = state.json("runs/run-1.json")
    assert record["finished"] == first["finished"]  # the first end of the run stays
    assert set(record["stages"]["rolled-back"]) == {"started", "finished"}
    assert [line["result"] for line in state.history()] == ["failed", "rolled_back"]
    assert state.history()[-1] == record


def test_finish_leaves_another_runs_lock_alone(state: State) -> None:
    state.ok("start", "run-1")
    state.ok("lock", "run-2")
    assert state.ok("finish", "run-1", data={"result": "succeeded"})["released"] is None
    assert state.json("lock.json")["run_id"] == "run-2"


# --------------------------------------------------------------------------------------- check mode


def test_check_mode_reports_changes_and_writes_nothing(state: State) -> None:
    # Nothing there yet: no directory is made.
    assert state.call("lock", "run-1", check=True)["changed"] is True
    assert state.call("start", "run-1", check=True, stage="prepare")["changed"] is True
    assert not state.dir.exists()

    state.ok("lock", "run-1")
    state.ok("start", "run-1", stage="prepare")
    state.ok("start", "run-0")
    before = state.snapshot()
    checks = {
        "lock by another run, forced": state.call("lock", "run-2", check=True, force=True),
        "start moving last-run back": state.call("start", "run-1", check=True, stage="prepare"),
        "update to a new stage": state.call("update", "run-1", check=True, stage="migrate"),
        "finish": state.call("finish", "run-1", check=True, data={"result": "succeeded"}),
        "unlock": state.call("unlock", "run-1", check=True),
    }
    assert {name: result["changed"] for name, result in checks.items()} == dict.fromkeys(checks, True)
    assert checks["lock by another run, forced"]["broken"]["run_id"] == "run-1"
    assert state.snapshot() == before

    # A finish that only releases the lock is a change too, in check mode as for real.
    state.ok("finish", "run-0", data={"result": "succeeded"})
    state.ok("unlock", "run-1")
    state.ok("lock", "run-0")
    assert state.call("finish", "run-0", check=True, data={"result": "succeeded"})["changed"] is True
    assert state.ok("finish", "run-0", data={"result": "succeeded"})["changed"] is True
    assert not (state.root / "lock.json").exists()


def test_a_check_mode_run_carries_its_record_in_memory_and_writes_nothing(state: State) -> None:
    # A whole --check run: start writes nothing, so each later call passes the record it was given back.
    started = state.call("start", "run-1", check=True, stage="prepare", data={"to_release": "v2"})["run"]
    planned = state.call("update", "run-1", check=True, stage="plan", data={"strategy": "rolling"}, check_record=started)["run"]
    assert planned["to_release"] == "v2" and planned["strategy"] == "rolling" and set(planned["stages"]) == {"prepare", "plan"}
    finished = state.call("finish", "run-1", check=True, data={"result": "planned"}, check_record=planned)["run"]
    assert finished["result"] == "planned" and "finished" in finished
    # Another run's record is not taken for this one's, and outside check mode the record must exist.
    assert state.call("update", "run-2", check=True, check_record=planned)["failed"] is True
    assert not state.dir.exists()
    assert state.call("update", "run-1", check_record=planned)["failed"] is True


def test_refusals_hold_in_check_mode(state: State) -> None:
    state.ok("lock", "run-1")
    assert state.call("lock", "run-2", check=True)["held"] is True
    assert state.call("unlock", "run-2", check=True)["failed"] is True


# ------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("bad", ["../escape", "a/b", ".hidden", "-dash", "", "x" * 129, "spa ce", "new\nline", "trailing\n"])
def test_ids_that_are_not_plain_names_are_refused(state: State, bad: str) -> None:
    result = state.call("lock", bad)
    assert result["failed"] is True and "not a plain name" in result["msg"]
    if bad:
        result = state.call("read", "run-1", project=bad)
        assert result["failed"] is True and "not a plain name" in result["msg"]
        assert state.call("read", bad)["failed"] is True
    assert not state.dir.exists()
    assert not any(p.name in {"escape", "b"} for p in state.tmp.rglob("*"))


def test_read_returns_lock_last_run_and_the_named_run(state: State) -> None:
    empty = state.ok("read")
    assert empty == {**empty, "changed": False, "lock": None, "last_run": None, "run": None}
    state.ok("start", "run-1", data={"n": 1})
    state.ok("start", "run-2", data={"n": 2})
    state.ok("lock", "run-2")
    status = state.ok("read", "run-1")
    assert status["lock"]["run_id"] == "run-2"
    assert status["last_run"]["n"] == 2
    assert status["run"]["n"] == 1


def test_loads_as_an_ansible_module_through_the_library_path(state: State) -> None:
    state.ok("lock", "run-a", data={"owner": "alice"})
    args = json.dumps({"action": "lock", "state_dir": str(state.dir), "project": PROJECT, "run_id": "run-b"})
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_STDOUT_CALLBACK": "json",
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
    }
    proc = subprocess.run(
        [
            "ansible",
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-m",
            "deploy_run",
            "-M",
            str(LIBRARY),
            "-a",
            args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    assert result["failed"] is True and result["held"] is True
    assert result["lock"]["owner"] == "alice" and result["lock"]["run_id"] == "run-a"


def test_a_run_that_changed_nothing_hands_the_last_run_pointer_back(state: State) -> None:
    state.ok("start", "run-1", data={"to_release": "v2"})
    state.ok("finish", "run-1", data={"result": "succeeded"})
    noop = state.ok("start", "run-2", data={"to_release": "v2"})
    assert noop["run"]["previous_run"] == "run-1"
    assert (state.root / "last-run").read_text() == "run-2\n"  # while it runs, it is the last run
    state.ok("finish", "run-2", data={"result": "unchanged", "changed_nothing": True})
    assert (state.root / "last-run").read_text() == "run-1\n"
    assert state.ok("read")["last_run"]["run_id"] == "run-1"
    assert [r["run_id"] for r in state.history()] == ["run-1", "run-2"]
    # A run that changed something keeps the pointer.
    state.ok("start", "run-3", data={"to_release": "v3"})
    state.ok("finish", "run-3", data={"result": "succeeded", "changed_nothing": False})
    assert (state.root / "last-run").read_text() == "run-3\n"
    assert state.json("runs/run-3.json")["previous_run"] == "run-1"
