"""The djm CLI (scripts/djm.py, scripts/djm_report.py): exit codes, the run report from recorded runner
events and run records (a successful and a failed run), the HTML page, --help; and the JSON event log
callback (plugins/callback/djm_events.py) on a real ansible-playbook run: stages, the run id, decisions
from the real deploy_run module, and no_log results never written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import djm  # noqa: E402
import djm_report  # noqa: E402
from djm_report import EXIT_NEEDS_HUMAN, EXIT_OK, EXIT_REFUSED, EXIT_ROLLED_BACK, Timeline  # noqa: E402

RUN = "20261130T120000Z-abcde"


# ------------------------------------------------------------------------------------------ recorded events
class Stream:
    """Runner events as ansible-runner hands them to an event_handler (the fields djm reads)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.t = 0.0
        self.play = ""
        self.uuids: dict[str, int] = {}

    def stamp(self, dt: float = 1.0) -> str:
        self.t += dt
        return f"2026-11-30T12:{int(self.t // 60):02d}:{self.t % 60:06.3f}"

    def play_start(self, name: str, pattern: str, uuid: str = "") -> None:
        uuid = uuid or f"uuid-{name}"
        self.uuids[uuid] = self.uuids.get(uuid, 0) + 1
        suffix = "" if self.uuids[uuid] == 1 else f"_{self.uuids[uuid] - 1}"
        self.play = name
        self.events.append(
            {
                "event": "playbook_on_play_start",
                "created": self.stamp(0.1),
                "event_data": {"play": name, "play_pattern": pattern, "play_uuid": uuid + suffix},
            }
        )

    def result(
        self,
        host: str,
        task: str,
        status: str = "ok",
        res: dict[str, Any] | None = None,
        action: str = "command",
        role: str = "",
        seconds: float = 1.0,
    ) -> None:
        start = self.stamp(0.1)
        end = self.stamp(seconds)
        kind = {
            "ok": "runner_on_ok",
            "failed": "runner_on_failed",
            "unreachable": "runner_on_unreachable",
            "skipped": "runner_on_skipped",
        }[status]
        self.events.append(
            {
                "event": kind,
                "created": end,
                "event_data": {
                    "host": host,
                    "task": task,
                    "play": self.play,
                    "res": res or {},
                    "start": start,
                    "end": end,
                    "resolved_action": action,
                    "role": role,
                },
            }
        )

    def record(self, host: str, record: dict[str, Any], project: str = "acme") -> None:
        self.result(
            host,
            "Record the run",
            res={"changed": True, "run": record, "invocation": {"module_args": {"project": project}}},
            action="deploy_run",
            role="deploy_run",
        )


PLAN = {
    "migrations": [
        {"migration": "catalog.0002_category", "class": "expand", "reversible": True, "atomic": True, "operations": [{}, {}]},
        {
            "migration": "catalog.0004_remove_<b>category</b>",
            "class": "contract",
            "reversible": True,
            "atomic": True,
            "operations": [{}],
        },
    ],
    "locking_risks": [{"migration": "catalog.0002_category", "kind": "index_build"}],
    "deferred_statements": [
        {
            "migration": "catalog.0004_remove_<b>category</b>",
            "kind": "RemoveField",
            "table": "products",
            "column": "category",
            "deferred_sql": ["ALTER TABLE products DROP COLUMN category"],
            "interim_sql": [],
        }
    ],
}


def migrate_stream(fail_at_migrate: bool, undo_finished: bool = True) -> Stream:
    s = Stream()
    s.play_start("Validate the inventory and the controller", "localhost")
    s.result("localhost", "Check the ansible-core version", action="assert")
    s.play_start("Preflight - every host answers, the app hosts serve one release", "app:db:lb")
    for host in ("lb1", "app1", "app2", "db1"):
        s.result(host, "Check that the host answers", action="ping")
    s.result("localhost", "Make this run's id on the controller", res={"ansible_facts": {"djm_run_id": RUN}}, action="set_fact")
    s.play_start("Lock - take the deploy lock and start the run record", "db[0]")
    record: dict[str, Any] = {
        "run_id": RUN,
        "playbook": "migrate",
        "from_release": "v1",
        "to_release": "v2",
        "hosts": ["app1", "app2"],
        "stage": "prepare",
        "stages": {"prepare": {"started": "2026-11-30T12:00:10Z"}},
    }
    s.record("db1", record)
    s.play_start("Prepare - the target release on every app host, beside the live one", "app")
    s.result("app1", "Prepare the release", res={"changed": True}, seconds=30)
    s.result("app2", "Prepare the release", res={"changed": True}, seconds=31)
    s.play_start("Plan - pending migrations, their classes and the strategy", "app[0]")
    record = {**record, "stage": "plan", "strategy": "two_phase", "strategy_reason": "the plan says two_phase", "plan": PLAN}
    s.record("db1", record)
    s.play_start("Maintenance - open the window before the backup when the strategy needs it", "db[0]")
    s.result("db1", "Skip the stage if the run failed", action="include_tasks")
    s.result(
        "db1", "Remove a file on the controller", res={"_ansible_delegated_vars": {"ansible_host": "localhost"}}, action="file"
    )
    s.result("db1", "Answer 503", status="skipped")
    s.play_start("Backup - a verified backup of the database, keyed by this run", "db[0]")
    record = {
        **record,
        "stage": "backup",
        "backup_id": f"pre-v2-{RUN}",
        "stages": {**record["stages"], "backup": {"bytes": 1234, "files": 5, "verified": True}},
    }
    s.record("db1", record)
    s.play_start("Migrate - apply the release's migrations once, from the first app host", "app[0]")
    if fail_at_migrate:
        s.result(
            "app1",
            "Run manage.py migrate in the new release",
            status="failed",
            role="django_release",
            res={"msg": "non-zero return code", "stderr_lines": ["", "django.db.utils.ProgrammingError: <boom>"]},
        )
        failure = {"stage": "migrate", "host": "app1", "cause": "non-zero return code: ProgrammingError"}
        record = {**record, "failure": failure, "applied": ["catalog.0002_category"]}
        s.record("db1", record)
        s.play_start("Converge - decide how to undo the run", "app[0]")
        converge = {"mode": "reverse", "to": "v1", "result": "done", "applied": ["catalog.0002_category"]}
        if not undo_finished:
            converge = {"mode": "reverse", "to": "v1", "failed": "reverse: migrate back failed"}
        record = {
            **record,
            "converge": converge,
            "validation": {
                "against": f"pre-v2-{RUN}",
                "schema_equal": True,
                "migrations_equal": True,
                "tables_changed": ["public.orders 3"],
            },
        }
        s.record("db1", record)
        s.play_start("Converge - reverse the migrations with the new release's code", "app[0]")
        s.result("app1", "Migrate back to the recorded nodes", res={"changed": True}, seconds=4)
        s.play_start("Finish - close the window, write the history, release the lock", "db[0]")
        record = {**record, "result": "rolled_back" if undo_finished else "failed", "serving": {"app1": "v1", "app2": "v1"}}
        s.record("db1", record)
        s.result(
            "db1",
            "Fail the run with its cause",
            status="failed",
            action="fail",
            res={"msg": "Migration to v2 failed at stage migrate"},
        )
    else:
        s.result("app1", "Run manage.py migrate in the new release", res={"changed": True}, seconds=5)
        record = {**record, "applied": ["catalog.0002_category", "catalog.0004_remove_<b>category</b>"]}
        s.record("db1", record)
        s.play_start("Switch - one app host at a time behind HAProxy (rolling)", "app", uuid="switch")
        s.result("app1", "Switch the current link", res={"changed": True}, seconds=10)
        s.play_start("Switch - one app host at a time behind HAProxy (rolling)", "app", uuid="switch")
        s.result("app2", "Switch the current link", res={"changed": True}, seconds=10)
        # The maintenance strategy's switch play, which ends at once in a rolling run.
        s.play_start("Switch - every app host at once behind the maintenance page", "app")
        s.result(
            "app1",
            "Remove the batches file of the rolling play",
            res={"changed": True, "_ansible_delegated_vars": {"ansible_host": "localhost"}},
            action="file",
        )
        s.result("app1", "Skip the stage if the run failed", action="include_tasks")
        s.result("app1", "Leave this to the maintenance strategy", action="meta")
        s.play_start("Finish - close the window, write the history, release the lock", "db[0]")
        record = {**record, "result": "succeeded", "serving": {"app1": "v2", "app2": "v2"}}
        s.record("db1", record)
        s.result(
            "db1", "Report the run", res={"msg": f"Run {RUN}: succeeded; app hosts serve v2."}, action="ansible.builtin.debug"
        )
    s.events.append(
        {"event": "playbook_on_stats", "created": s.stamp(), "event_data": {"ok": {"db1": 5}, "failures": {}, "dark": {}}}
    )
    return s


def timeline_of(stream: Stream) -> Timeline:
    timeline = Timeline()
    for event in stream.events:
        timeline.feed(event)
    return timeline


def report_of(command: str, timeline: Timeline, succeeded: bool, tmp_path: Path) -> dict[str, Any]:
    code = djm_report.exit_code(command, succeeded, timeline.run_id, timeline.record)
    paths = {k: str(tmp_path / f"{RUN}.{k}") for k in ("json", "html")}
    return djm_report.build_report(
        command, timeline, code, argv_summary={}, paths=paths, wall_started="2026-11-30T12:00:00Z", seconds=100.0
    )


# ------------------------------------------------------------------------------------------ exit codes
@pytest.mark.parametrize(
    ("command", "succeeded", "run_id", "record", "roles", "expected"),
    [
        ("migrate", True, RUN, {"run_id": RUN, "result": "succeeded"}, None, EXIT_OK),
        ("migrate", False, RUN, {"run_id": RUN, "result": "rolled_back"}, None, EXIT_ROLLED_BACK),
        ("migrate", False, RUN, {"run_id": RUN, "result": "failed"}, None, EXIT_NEEDS_HUMAN),
        ("migrate", False, RUN, {"run_id": RUN, "stage": "switch"}, None, EXIT_NEEDS_HUMAN),  # interrupted: no result
        ("migrate", False, "", None, None, EXIT_REFUSED),  # validation failed: no run id
        ("migrate", False, RUN, None, None, EXIT_REFUSED),  # preflight failed: no record
        ("migrate", False, RUN, {"run_id": "20261129T000000Z-other", "result": "succeeded"}, None, EXIT_REFUSED),  # lock held
        ("plan", False, RUN, {"run_id": RUN, "result": "rolled_back"}, None, EXIT_REFUSED),  # --check writes nothing
        ("plan-prepare", False, RUN, {"run_id": RUN, "result": "rolled_back"}, None, EXIT_ROLLED_BACK),
        ("plan", True, RUN, {"run_id": RUN, "result": "planned"}, None, EXIT_OK),
        ("rollback", True, "rollback-1", {"run_id": RUN, "result": "rolled_back"}, None, EXIT_OK),
        ("rollback", False, "rollback-1", None, None, EXIT_REFUSED),  # nothing recorded to undo
        ("rollback", False, "rollback-1", {"run_id": RUN, "rollback_requested": {"by_run": "rollback-0"}}, None, EXIT_REFUSED),
        (
            "rollback",
            False,
            "rollback-1",
            {"run_id": RUN, "rollback_requested": {"by_run": "rollback-1"}},
            None,
            EXIT_NEEDS_HUMAN,
        ),
        ("status", False, "", None, None, EXIT_REFUSED),
        ("backups-verify", False, "", None, ["pg_restore"], EXIT_NEEDS_HUMAN),  # a corrupt backup
        ("backups-verify", False, "", None, [""], EXIT_REFUSED),  # db host unreachable
    ],
)
def test_exit_code(
    command: str, succeeded: bool, run_id: str, record: dict[str, Any] | None, roles: list[str] | None, expected: int
) -> None:
    assert djm_report.exit_code(command, succeeded, run_id, record, roles) == expected


def test_help_documents_every_exit_code_and_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        djm.parse_args(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for needle in (
        "plan",
        "migrate",
        "rollback",
        "status",
        "backups list",
        "backups verify",
        "build/reports/<project>/<run id>.html",
        "djm report RUN.json",
        "Ctrl-C cancels the run",
        "a second Ctrl-C kills",
        "marked as an estimate",
    ):
        assert needle in text
    for code in range(4):
        assert f"\n  {code}  " in text
    with pytest.raises(SystemExit):
        djm.parse_args(["migrate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--load-summary FILE" in text and "loadgen.py run --summary FILE" in text and "loadgen.py verify --json" in text


def test_bad_arguments_are_refused_with_exit_3() -> None:
    with pytest.raises(SystemExit) as stop:
        djm.parse_args(["migrate", "--strategy", "yolo"])
    assert stop.value.code == EXIT_REFUSED


def test_a_crash_of_djm_itself_never_exits_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def boom(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("no runner")

    monkeypatch.setattr(djm, "command_run", boom)
    monkeypatch.setattr(djm, "RUNS_STARTED", 0)
    assert djm.main(["migrate", "v2"]) == EXIT_REFUSED  # nothing was started
    monkeypatch.setattr(djm, "RUNS_STARTED", 1)
    assert djm.main(["migrate", "v2"]) == EXIT_NEEDS_HUMAN  # a run was under way
    assert "RuntimeError: no runner" in capsys.readouterr().err


def test_project_of_a_run_refused_before_the_lock_comes_from_the_event_log(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text('{"event": "run_start"}\nnot json\n{"event": "project", "project": "acme shop"}\n')
    assert djm.project_from_events(log) == "acme_shop"
    log.write_text('{"event": "run_start"}\n')
    assert djm.project_from_events(log) == ""


def test_extra_var_names_never_values() -> None:
    args = djm.parse_args(["migrate", "-e", "project_release_id=v2 db_password=hunter2", "-e", '{"a": 1}', "-e", "@vars.yml"])
    names = djm.extra_var_names(args)
    assert names == ["project_release_id", "db_password", "<json>", "@vars.yml"]
    assert "hunter2" not in json.dumps(names)
    assert djm.ansible_args(args)[:2] == ["-e", "project_release_id=v2 db_password=hunter2"]


# ------------------------------------------------------------------------------------------ reports
def test_report_of_a_successful_run(tmp_path: Path) -> None:
    timeline = timeline_of(migrate_stream(fail_at_migrate=False))
    report = report_of("migrate", timeline, True, tmp_path)
    assert report["exit_code"] == EXIT_OK and report["result"] == "succeeded"
    assert report["project"] == "acme" and report["run_id"] == RUN
    assert [s["stage"] for s in report["stages"]] == [
        "validate",
        "preflight",
        "lock",
        "prepare",
        "plan",
        "maintenance",
        "backup",
        "migrate",
        "switch",
        "finish",
    ]
    by_stage = {s["stage"]: s for s in report["stages"]}
    assert by_stage["prepare"]["seconds"] >= 30 and set(by_stage["prepare"]["hosts"]) == {"app1", "app2"}
    assert not by_stage["maintenance"]["ran"]  # only an include and a skipped task
    assert by_stage["switch"]["batches"] == 2
    assert by_stage["switch"]["hosts"]["app1"]["batch"] == 1 and by_stage["switch"]["hosts"]["app2"]["batch"] == 2
    # The timeline draws each host's own work: app2 switched after app1, not the whole stage for both.
    (app1,), (app2,) = by_stage["switch"]["hosts"]["app1"]["segments"], by_stage["switch"]["hosts"]["app2"]["segments"]
    assert app1[1] - app1[0] >= 10 and app2[0] >= app1[1]
    assert report["strategy"] == "two_phase" and report["backup_id"] == f"pre-v2-{RUN}"
    assert report["backup"] == {"bytes": 1234, "files": 5, "verified": True}
    assert report["plan"][0]["migration"] == "catalog.0002_category" and report["plan"][0]["locking_risks"] == 1
    assert len(report["migrations_applied"]) == 2
    assert report["errors"] == []
    assert report["said"] == f"Run {RUN}: succeeded; app hosts serve v2."


@pytest.mark.parametrize(("undo_finished", "expected"), [(True, EXIT_ROLLED_BACK), (False, EXIT_NEEDS_HUMAN)])
def test_report_of_a_failed_run(tmp_path: Path, undo_finished: bool, expected: int) -> None:
    timeline = timeline_of(migrate_stream(fail_at_migrate=True, undo_finished=undo_finished))
    report = report_of("migrate", timeline, False, tmp_path)
    assert report["exit_code"] == expected
    assert report["result"] == ("rolled_back" if undo_finished else "failed")
    assert report["failure"]["stage"] == "migrate"
    assert report["errors"][0]["stage"] == "migrate" and "ProgrammingError: <boom>" in report["errors"][0]["msg"]
    assert report["converge"]["mode"] == "reverse"
    assert report["validation"]["schema_equal"] is True
    assert report["migrations_applied"] == ["catalog.0002_category"]
    by_stage = {s["stage"]: s for s in report["stages"]}
    assert by_stage["migrate"]["failed"] and "switch" not in by_stage

    djm_report.write_report(report)
    written = json.loads((tmp_path / f"{RUN}.json").read_text())
    assert written["exit_code"] == expected and written["record"]["run_id"] == RUN
    page = (tmp_path / f"{RUN}.html").read_text()
    # Self-contained (no script, no external resource), escaped, with the timeline, plan and proof.
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "&lt;boom&gt;" in page and "<boom>" not in page
    assert "catalog.0004_remove_&lt;b&gt;category&lt;/b&gt;" in page
    assert "Stage timeline per host" in page and 'class="bar failed"' in page
    assert "schema equal to the backup&#x27;s" in page and "public.orders 3" in page
    assert (tmp_path / f"{RUN}.json").stat().st_mode & 0o777 == 0o640


def test_a_run_refused_in_validation_has_no_run_id_and_exit_3(tmp_path: Path) -> None:
    s = Stream()
    s.play_start("Validate the inventory and the controller", "localhost")
    s.result(
        "localhost",
        "Check that the required groups exist and have hosts",
        status="failed",
        action="assert",
        res={"msg": "Inventory group 'db' is missing."},
    )
    timeline = timeline_of(s)
    report = report_of("migrate", timeline, False, tmp_path)
    assert report["exit_code"] == EXIT_REFUSED and report["run_id"] is None and report["result"] is None
    assert report["errors"][0]["msg"] == "Inventory group 'db' is missing."


def test_batch_total_estimates() -> None:
    assert djm_report.batch_total(0, 1, 1, 3) == 3  # serial 1: 1/3
    assert djm_report.batch_total(1, 2, 1, 3) == 3
    assert djm_report.batch_total(1, 2, 4, 9) == 3  # a canary alone, then batches of 4: 1 + 2
    assert djm_report.batch_total(5, 3, 4, 9) == 3


def test_progress_shows_stages_batches_and_failures() -> None:
    import io

    out = io.StringIO()
    progress = djm.Progress(Timeline(), stream=out, live=False)
    for event in migrate_stream(fail_at_migrate=False).events:
        progress.event(event)
    text = out.getvalue()
    assert "▸ prepare" in text and "strategy two_phase" in text
    assert "▸ maintenance" not in text  # nothing ran there
    assert "batch 1/2: app1 done" in text and "batch 2/2: app2" in text
    assert "every app host at once" not in text  # a play of the stage that did nothing is not announced

    out = io.StringIO()
    progress = djm.Progress(Timeline(), stream=out, live=False)
    for event in migrate_stream(fail_at_migrate=True).events:
        progress.event(event)
    text = out.getvalue()
    assert "✗ migrate      app1: Run manage.py migrate in the new release: non-zero return code" in text
    assert "converge     undo by reverse to v1" in text and "finish       result rolled_back" in text
    assert "  converge     reverse the migrations with the new release's code" in text  # the stage's next play


# ------------------------------------------------------------------------------------------ the event log
CALLBACK_PLAYBOOK = """
- name: Preflight - the controller answers
  hosts: localhost
  gather_facts: false
  vars:
    project_name: cbtest
  tasks:
    - name: Make this run's id on the controller
      ansible.builtin.set_fact:
        djm_run_id: "{run_id}"
    - name: Start the run record
      deploy_run:
        action: start
        state_dir: "{state}"
        project: cbtest
        run_id: "{run_id}"
        stage: plan
        data: {{strategy: two_phase, strategy_reason: the plan says so}}
    - name: Handle a secret
      ansible.builtin.debug:
        msg: "password is {secret}"
      no_log: true
    - name: Fail with a secret, ignored
      ansible.builtin.command: "sh -c 'echo {secret} >&2; exit 1'"
      no_log: true
      ignore_errors: true
      changed_when: false
    - name: Loop over secrets
      ansible.builtin.debug:
        msg: "{{{{ item }}}}"
      loop: ["{secret}"]
      no_log: true
    - name: Say hello
      ansible.builtin.debug:
        msg: hello
- name: Switch - one host at a time
  hosts: all
  gather_facts: false
  serial: 1
  tasks:
    - name: Say which host
      ansible.builtin.debug:
        msg: "{{{{ inventory_hostname }}}}"
- name: Switch - fail
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Fail the run
      ansible.builtin.fail:
        msg: boom
"""


def test_event_log_callback(tmp_path: Path) -> None:
    secret = "s3cr3t-Vb7Qx"
    playbook = tmp_path / "play.yml"
    playbook.write_text(CALLBACK_PLAYBOOK.format(run_id=RUN, state=tmp_path / "state", secret=secret))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_CALLBACK_PLUGINS": str(REPO / "plugins" / "callback"),
        "ANSIBLE_CALLBACKS_ENABLED": "djm_events",
        "ANSIBLE_LIBRARY": str(REPO / "roles" / "deploy_run" / "library"),
        "DJM_EVENTS_DIR": str(tmp_path / "events"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    env.pop("DJM_EVENTS_FILE", None)
    proc = subprocess.run(
        [
            "ansible-playbook",
            "-c",
            "local",
            "-i",
            "localhost,127.0.0.1,",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(playbook),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    files = list((tmp_path / "events").rglob("*.jsonl"))
    assert [f.relative_to(tmp_path / "events").as_posix() for f in files] == [f"cbtest/{RUN}.jsonl"]  # renamed once known
    text = files[0].read_text()
    assert secret not in text
    assert files[0].stat().st_mode & 0o777 == 0o600
    events = [json.loads(line) for line in text.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert {"stage": "preflight"}.items() <= next(e for e in events if e["event"] == "stage_start").items()
    assert any(e["event"] == "run_id" and e["run_id"] == RUN for e in events)
    decisions = {e["key"]: e["value"] for e in events if e["event"] == "decision"}
    assert decisions["strategy"] == "two_phase" and decisions["strategy_reason"] == "the plan says so"
    hidden = [e for e in events if e["event"] == "host_result" and e.get("no_log")]
    assert len(hidden) == 3 and all("msg" not in e for e in hidden)
    assert any(e.get("msg") == "hello" for e in events)
    batches = [(e["stage"], e["batch"]) for e in events if e["event"] == "batch"]
    assert batches == [("switch", 2)]  # the serial play's second host
    errors = [e for e in events if e["event"] == "error"]
    assert [(e["stage"], e["msg"]) for e in errors] == [("switch", "boom")]  # the ignored failure is no error
    assert events[-1]["failed"] is True and events[-1]["run_id"] == RUN


def test_event_log_sees_batches_under_ansible_runner(tmp_path: Path) -> None:
    """ansible-runner's own callback renames a repeated play's uuid (<uuid>_k) before ours sees it."""
    import ansible_runner

    (tmp_path / "hosts.ini").write_text(
        f"h1 ansible_connection=local ansible_python_interpreter={sys.executable}\nh2 ansible_connection=local\n"
    )
    (tmp_path / "play.yml").write_text(
        "- name: Switch - one host at a time\n  hosts: all\n  gather_facts: false\n  serial: 1\n"
        "  vars:\n    ansible_python_interpreter: " + sys.executable + "\n"
        "  tasks:\n    - name: Say which host\n      ansible.builtin.debug:\n        msg: hi\n"
    )
    log = tmp_path / "events.jsonl"
    (tmp_path / "runner").mkdir()
    pids: set[Any] = set()
    runner = ansible_runner.run(
        private_data_dir=str(tmp_path / "runner"),
        playbook=str(tmp_path / "play.yml"),
        inventory=str(tmp_path / "hosts.ini"),
        quiet=True,
        event_handler=lambda event: pids.add(event.get("pid")) or False,
        settings={"pexpect_timeout": djm.RUNNER_POLL_SECONDS},
        envvars={
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "ANSIBLE_CALLBACK_PLUGINS": str(REPO / "plugins" / "callback"),
            "ANSIBLE_CALLBACKS_ENABLED": "djm_events",
            "DJM_EVENTS_FILE": str(log),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        },
    )
    assert runner.status == "successful"
    # Every runner event carries ansible-playbook's pid: what djm's second Ctrl-C kills (never djm itself).
    assert len(pids) == 1 and isinstance(next(iter(pids)), int) and os.getpid() not in pids
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["stage"], e["batch"]) for e in events if e["event"] == "batch"] == [("switch", 2)]
    assert sorted(e["host"] for e in events if e["event"] == "host_result") == ["h1", "h2"]


# ------------------------------------------------------------------------------------------ Ctrl-C
class FakeRunner:
    """ansible_runner.run as djm calls it: hands over recorded events, then runs "forever", sending
    djm (this process) `sigints` SIGINTs and asking cancel_callback as the real runner's loop does;
    returns `canceled` once asked to, unless it ignores the cancel (a runner that will not return)."""

    def __init__(
        self, events: list[dict[str, Any]], sigints: int = 1, ignore_cancel: bool = False, pid: int = 999999, status: str = ""
    ) -> None:
        self.events, self.sigints, self.ignore_cancel, self.pid = events, sigints, ignore_cancel, pid
        self.status = status  # "successful"/"failed": return that after the events, no Ctrl-C
        self.kwargs: dict[str, Any] = {}
        self.called = 0

    def run(self, **kwargs: Any) -> Any:
        import signal
        import time
        from types import SimpleNamespace

        self.called += 1
        self.kwargs = kwargs
        for event in self.events:
            kwargs["event_handler"]({**event, "pid": self.pid})
        if self.status:
            return SimpleNamespace(rc=0 if self.status == "successful" else 2, status=self.status, stdout=None)
        deadline = time.monotonic() + 10
        sent = 0
        while time.monotonic() < deadline:
            if sent < self.sigints:
                sent += 1
                os.kill(os.getpid(), signal.SIGINT)
            if kwargs["cancel_callback"]() and not self.ignore_cancel:
                return SimpleNamespace(rc=254, status="canceled", stdout=None)
            time.sleep(0.01)
        raise AssertionError("djm never stopped the fake runner")


def events_until(stream: Stream, stop: str) -> list[dict[str, Any]]:
    """The stream's events up to the first play whose name starts with `stop` (excluded)."""
    for index, event in enumerate(stream.events):
        if event["event"] == "playbook_on_play_start" and event["event_data"]["play"].startswith(stop):
            return stream.events[:index]
    raise AssertionError(stop)


@pytest.fixture
def sigint_ignored() -> Any:
    """SIGINT ignored as a non-interactive shell leaves it for a job started with `&` (the case where
    one Ctrl-C in three was lost): djm must handle it all the same."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


def run_djm(monkeypatch: pytest.MonkeyPatch, fake: FakeRunner, argv: list[str], tmp_path: Path) -> int:
    import types

    monkeypatch.setitem(sys.modules, "ansible_runner", types.SimpleNamespace(run=fake.run))
    monkeypatch.setattr(djm, "RUNS_STARTED", 0)
    return djm.main([*argv, "--reports-dir", str(tmp_path)])


def test_first_ctrl_c_cancels_the_runner_and_names_the_held_lock(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, sigint_ignored: Any
) -> None:
    import signal

    fake = FakeRunner(events_until(migrate_stream(fail_at_migrate=False), "Prepare"))
    code = run_djm(monkeypatch, fake, ["migrate", "v2", "-i", "staging"], tmp_path)
    out, err = capsys.readouterr()
    assert code == EXIT_NEEDS_HUMAN
    assert fake.kwargs["cancel_callback"]() is True  # asked after the Ctrl-C: cancel
    assert fake.kwargs["settings"] == {"pexpect_timeout": djm.RUNNER_POLL_SECONDS}
    assert "Ctrl-C: cancelling the run" in err and "force-stop" in err
    assert "stopped   cancelled by Ctrl-C" in out
    assert f"lock      held by run {RUN}, stopped in stage prepare" in out
    assert "next      `djm rollback -i staging` finishes it" in out
    report = json.loads((tmp_path / "acme" / f"{RUN}.json").read_text())
    assert report["interrupted"]["status"] == "canceled" and report["exit_code"] == EXIT_NEEDS_HUMAN
    assert "cancelled by Ctrl-C (ansible-runner stopped ansible-playbook)" in (tmp_path / "acme" / f"{RUN}.html").read_text()
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # djm put back what it found


def test_ctrl_c_before_the_lock_changed_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fake = FakeRunner(events_until(migrate_stream(fail_at_migrate=False), "Lock"))
    assert run_djm(monkeypatch, fake, ["migrate", "v2"], tmp_path) == EXIT_REFUSED
    assert "nothing   stopped before the deploy lock: nothing changed" in capsys.readouterr().out


def test_ctrl_c_before_the_runner_starts_runs_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, sigint_ignored: Any
) -> None:
    import signal

    real = djm.ansible_args

    def slow_setup(args: Any) -> list[str]:  # a Ctrl-C while djm is still setting up (importing, reading args)
        os.kill(os.getpid(), signal.SIGINT)
        return real(args)

    monkeypatch.setattr(djm, "ansible_args", slow_setup)
    fake = FakeRunner([])
    assert run_djm(monkeypatch, fake, ["migrate", "v2"], tmp_path) == EXIT_REFUSED
    assert fake.called == 0
    out, err = capsys.readouterr()
    assert "no playbook is running" in err and "nothing   no playbook ran: nothing changed, no lock taken" in out


def test_second_ctrl_c_kills_the_playbook_and_stops(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # ansible-playbook stand-in: a process in a session of its own, as pexpect starts it.
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        fake = FakeRunner(
            events_until(migrate_stream(fail_at_migrate=False), "Plan"), sigints=2, ignore_cancel=True, pid=child.pid
        )
        code = run_djm(monkeypatch, fake, ["migrate", "v2"], tmp_path)
        assert child.wait(timeout=5) == -9  # SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    out, err = capsys.readouterr()
    assert code == EXIT_NEEDS_HUMAN
    assert f"second Ctrl-C: force-stop, ansible-playbook's process group (pid {child.pid}) killed" in err
    assert "stopped   force-stopped by a second Ctrl-C" in out and f"held by run {RUN}" in out
    assert json.loads((tmp_path / "acme" / f"{RUN}.json").read_text())["interrupted"]["status"] == "force-stopped"


def test_second_ctrl_c_is_not_swallowed_by_the_display_guard(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A display bug never stops a run (on_event catches Exception): a force-stop arriving while an
    event is shown must get through all the same."""
    import signal

    def second_ctrl_c_while_showing(self: Any, change: Any, event: dict[str, Any]) -> None:
        if event["event"] == "playbook_on_play_start" and event["event_data"]["play"].startswith("Plan"):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(djm.Progress, "show", second_ctrl_c_while_showing)
    fake = FakeRunner(events_until(migrate_stream(fail_at_migrate=False), "Maintenance"), sigints=0, ignore_cancel=True)
    assert run_djm(monkeypatch, fake, ["migrate", "v2"], tmp_path) == EXIT_NEEDS_HUMAN
    out, err = capsys.readouterr()
    assert "progress display stopped" not in err and "second Ctrl-C: force-stop" in err
    assert "stopped   force-stopped by a second Ctrl-C" in out


def test_a_stopped_rollback_names_the_lock_it_holds() -> None:
    timeline = Timeline(run_id="rollback-1", record={"run_id": RUN, "rollback_requested": {"by_run": "rollback-1"}})
    code, said = djm.after_stop("rollback", "canceled", timeline, ["production"])
    assert code == EXIT_NEEDS_HUMAN
    assert "held by this rollback, run rollback-1; the undo of run " + RUN in said[1]
    assert "`djm rollback -i production -e rollback_break_lock=true`" in said[2]
    code, said = djm.after_stop("plan", "canceled", Timeline(run_id="x"), [])
    assert code == EXIT_REFUSED and "--check writes nothing" in said[1]
    timeline = Timeline(run_id=RUN, record={"run_id": RUN, "result": "succeeded"})
    code, said = djm.after_stop("migrate", "canceled", timeline, [])
    assert code == EXIT_NEEDS_HUMAN and "had recorded its result (succeeded)" in said[1]


def test_ctrl_c_cancels_a_real_ansible_playbook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real ansible-runner and ansible-playbook on localhost: a Ctrl-C while a task sleeps ends the
    run `canceled` within a few seconds (the runner asks cancel_callback every RUNNER_POLL_SECONDS)."""
    import signal
    import threading
    import time

    (tmp_path / "hosts.ini").write_text(f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    marker = f"{tmp_path}/long-step"
    (tmp_path / "play.yml").write_text(
        "- name: Backup - a long step\n  hosts: localhost\n  gather_facts: false\n"
        "  tasks:\n    - name: Sleep\n"
        f"      ansible.builtin.command: {sys.executable} -c 'import time; time.sleep(60)' {marker}\n"
    )

    def left_running() -> list[int]:  # the task's command, by its marker: started by this test only
        found = []
        for entry in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if marker.encode() in entry.read_bytes():
                    found.append(int(entry.parent.name))
            except OSError:
                continue
        return found

    args = djm.parse_args(["status", "-i", str(tmp_path / "hosts.ini")])
    djm.INTERRUPTS.reset()
    djm.INTERRUPTS.install()
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    try:
        timer.start()
        succeeded, status, kept = djm.run_playbook(str(tmp_path / "play.yml"), args, [], Timeline(), None)
    finally:
        timer.cancel()
        djm.INTERRUPTS.restore()
        (REPO / "build" / "events" / f".running-{os.getpid()}.jsonl").unlink(missing_ok=True)
        if kept.exists():
            kept.unlink()
            kept.parent.rmdir()
    survivors = left_running()
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert (succeeded, status) == (False, "canceled")
    assert time.monotonic() - started < 3.0 + djm.RUNNER_POLL_SECONDS + 5
    # ansible-core's worker runs the task in a session of its own: the runner's kill misses it, djm's does not.
    assert survivors == []
    err = capsys.readouterr().err
    assert "Ctrl-C: cancelling the run" in err and "stopped 1 ansible worker(s) still running a task" in err


# ------------------------------------------------------------------------------------------ load check
def load_files(tmp_path: Path, start: float, missing: list[int] | None = None) -> tuple[Path, Path]:
    """A loadgen summary made by loadgen's own summarize() (its format, not a copy of it) and a verify
    file as `loadgen.py verify --json` prints it."""
    import loadgen

    records = []
    for seq in range(20):
        kind = ("browse", "profile", "checkout")[seq % 3]
        failed = seq in (4, 5, 7)  # 5 checkout: 500; 4 profile, 7 profile: no answer
        status = 0 if seq in (4, 7) else 500 if failed else 200
        order = 100 + seq if kind == "checkout" and not failed else None
        records.append(
            {"t_start": start + seq * 0.5, "duration_ms": 20.0, "kind": kind, "status": status, "ok": not failed,
             "error": "connection refused" if status == 0 else "HTTP 500" if failed else None, "order_id": order, "headers": {}}
        )  # fmt: skip
    summary = {"url": "http://10.90.0.10:80", "stopped_by": "stop-file", **loadgen.summarize(records)}
    (tmp_path / "load.json").write_text(json.dumps(summary))
    acknowledged = summary["orders_acknowledged"]
    missing = missing or []
    verify = {"acknowledged": acknowledged, "found": acknowledged - len(missing), "missing": missing, "table": "orders.id"}
    (tmp_path / "verify.json").write_text(json.dumps(verify))
    return tmp_path / "load.json", tmp_path / "verify.json"


def test_load_check_counts_failures_and_missing_orders(tmp_path: Path) -> None:
    summary, verify = load_files(tmp_path, start=1000.0, missing=[108])
    check = djm_report.load_check(str(summary), str(verify), run_start=995.0, run_end=1100.0)
    assert check["problems"] == []
    assert (check["requests"], check["failed"], check["orders_acknowledged"]) == (20, 3, 5)
    assert check["failures_by_status"] == {"0": 2, "500": 1}
    assert check["failures_by_kind"] == {"checkout": {"500": 1}, "profile": {"0": 2}}
    assert check["orders_missing"] == [108] and check["window"]["covers_run_seconds"] == 9.5
    said = djm_report.load_line(check)
    assert said[0] == "20 requests, 3 failed; orders 5 acknowledged, 1 missing (108)"
    assert said[1] == "failed    checkout 500: 1, profile 0: 2 (status 0: no answer)"
    # Without a verify file the orders are not checked, and not reported as found.
    check = djm_report.load_check(str(summary), None, run_start=995.0, run_end=1100.0)
    assert check["orders_missing"] is None and "not checked against the database" in djm_report.load_line(check)[0]


def test_load_check_never_counts_another_runs_load(tmp_path: Path) -> None:
    summary, verify = load_files(tmp_path, start=1000.0)
    check = djm_report.load_check(str(summary), str(verify), run_start=2000.0, run_end=2100.0)
    assert "requests" not in check and "does not overlap this run" in check["problems"][0]
    check = djm_report.load_check(str(tmp_path / "absent.json"), None, run_start=2000.0, run_end=2100.0)
    assert "requests" not in check and "is it still running?" in check["problems"][0]
    (tmp_path / "other.json").write_text('{"total": 1}')
    check = djm_report.load_check(str(tmp_path / "other.json"), None, run_start=2000.0, run_end=2100.0)
    assert "not a loadgen.py summary" in check["problems"][0]
    assert djm_report.load_line(check) == [f"problem   {check['problems'][0]}"]


def test_migrate_with_a_load_summary_shows_it_in_the_summary_and_the_report(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import time

    summary, verify = load_files(tmp_path, start=time.time() - 2, missing=[])
    fake = FakeRunner(migrate_stream(fail_at_migrate=False).events, status="successful")
    code = run_djm(monkeypatch, fake, ["migrate", "v2", "--load-summary", str(summary), "--load-verify", str(verify)], tmp_path)
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "  load      20 requests, 3 failed; orders 5 acknowledged, 0 missing\n" in out
    assert "  failed    checkout 500: 1, profile 0: 2 (status 0: no answer)" in out
    report = json.loads((tmp_path / "acme" / f"{RUN}.json").read_text())
    assert report["load"]["failures_by_kind"] == {"checkout": {"500": 1}, "profile": {"0": 2}}
    page = (tmp_path / "acme" / f"{RUN}.html").read_text()
    assert "Load check (scripts/loadgen.py)" in page and "orders missing from the database</th><td>0</td>" in page


def test_djm_report_adds_a_load_check_afterwards(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    timeline = timeline_of(migrate_stream(fail_at_migrate=False))
    report = report_of("migrate", timeline, True, tmp_path)
    djm_report.write_report(report)
    assert "no load check given" in (tmp_path / f"{RUN}.html").read_text()
    run_start = 1796040000.0  # report_of's wall_started, 2026-11-30T12:00:00Z, and 100 s
    summary, verify = load_files(tmp_path, start=run_start + 50, missing=[102, 105])
    argv = ["report", str(tmp_path / f"{RUN}.json"), "--load-summary", str(summary), "--load-verify", str(verify)]
    assert djm.main(argv) == EXIT_OK
    assert "orders 5 acknowledged, 2 missing (102, 105)" in capsys.readouterr().out
    assert json.loads((tmp_path / f"{RUN}.json").read_text())["load"]["orders_missing"] == [102, 105]
    assert "missing order ids</th><td><code>[102, 105]</code>" in (tmp_path / f"{RUN}.html").read_text()
    summary, verify = load_files(tmp_path, start=run_start + 500)  # after the run: not its load
    assert djm.main(argv) == EXIT_REFUSED
    assert "does not overlap this run" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ long steps
DUMP_TASK = f"Take a snapshot-consistent pg_dump, watching the bytes written until it ends, as backup pre-v2-{RUN}"
PREFLIGHT = {"ok": True, "state": "absent", "db_size_bytes": 1000 * 2**20, "estimated_dump_bytes": 300 * 2**20}


def backup_stream(dump_seconds: float = 60.0) -> Stream:
    """The run up to the lock, then the backup stage: pg_backup's preflight (the database's size) and
    the dump, a long step."""
    s = Stream()
    s.events = events_until(migrate_stream(fail_at_migrate=False), "Prepare")
    s.t = 20.0
    s.play_start("Backup - a verified backup of the database, keyed by this run", "db[0]")
    s.result("db1", "Run the preflight checks for backup x", res={"stdout": json.dumps(PREFLIGHT)}, action="script")
    s.events.append({"event": "runner_on_start", "created": s.stamp(0.1), "event_data": {"host": "db1", "task": DUMP_TASK}})
    s.result("db1", DUMP_TASK, res={"changed": True}, seconds=dump_seconds)
    return s


def test_long_steps_are_recorded_with_the_database_size(tmp_path: Path) -> None:
    timeline = timeline_of(backup_stream(dump_seconds=60.0))
    assert timeline.db_size_bytes == 1000 * 2**20 and timeline.estimated_dump_bytes == 300 * 2**20
    assert timeline.long_steps == [
        {
            "step": "backup",
            "host": "db1",
            "task": DUMP_TASK,
            "stage": "backup",
            "seconds": 60.0,
            "status": "changed",
            "db_size_bytes": 1000 * 2**20,
        }
    ]
    report = report_of("migrate", timeline, False, tmp_path)
    assert report["long_steps"] == timeline.long_steps and report["database_size_bytes"] == 1000 * 2**20
    page = djm_report.render_html(report)
    assert "<h2>Long steps</h2>" in page
    assert "<td>backup</td><td>db1</td><td>backup</td><td>60.0</td><td>changed</td><td>1000 MiB</td>" in page
    assert djm_report.long_step("Install the requirements from the wheelhouse, offline") == "wheelhouse install"
    assert djm_report.long_step("Copy the virtualenv of the release from the controller") == "venv copy"
    assert djm_report.long_step("Restore the backup into a new database and require its fingerprints") == "restore"
    assert djm_report.long_step("Check that the host answers") == ""


def test_estimates_come_from_the_same_step_of_an_earlier_report(tmp_path: Path) -> None:
    import time

    steps = [
        {"step": "backup", "host": "db1", "seconds": 100.0, "status": "changed", "db_size_bytes": 500 * 2**20},
        {"step": "wheelhouse install", "host": "app1", "seconds": 30.0, "status": "changed"},
        {"step": "wheelhouse install", "host": "app2", "seconds": 40.0, "status": "changed"},
        {"step": "restore", "host": "db1", "seconds": 5.0, "status": "failed"},
    ]
    earlier = ("run-a", steps)
    assert djm_report.estimate(earlier, "backup", "db1", 1000 * 2**20) == {
        "seconds": 200.0,
        "label": "estimate: run run-a took 100 s at 500 MiB, scaled to 1000 MiB",
    }
    assert djm_report.estimate(earlier, "backup", "db1", None)["seconds"] == 100.0  # size unknown: not scaled
    assert djm_report.estimate(earlier, "wheelhouse install", "app2", 10**9)["seconds"] == 40.0  # that host's, never scaled
    assert djm_report.estimate(earlier, "wheelhouse install", "app9", None)["seconds"] == 40.0  # the longest elsewhere
    assert djm_report.estimate(earlier, "restore", "db1", None) is None  # a failed restore is no estimate
    assert djm_report.estimate(("", []), "backup", "db1", None) is None

    where = tmp_path / "acme"
    where.mkdir()
    (where / "old.json").write_text(json.dumps({"run_id": "old", "long_steps": steps}))
    (where / "plain.json").write_text(json.dumps({"run_id": "plain", "long_steps": []}))  # a plan: no long step
    (where / f"{RUN}.json").write_text(json.dumps({"run_id": RUN, "long_steps": [{"step": "backup"}]}))  # this run
    for age, name in enumerate(["old", "plain", RUN]):
        os.utime(where / f"{name}.json", (time.time() - 100 + age, time.time() - 100 + age))
    assert djm_report.earlier_long_steps(tmp_path, "acme", RUN) == ("old", steps)
    assert djm_report.earlier_long_steps(tmp_path, "other", RUN) == ("", [])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress_of(stream: Stream, reports: Path, live: bool, clock: Clock, stop_before_result: bool = True) -> Any:
    import io

    out = io.StringIO()
    progress = djm.Progress(Timeline(), stream=out, live=live, reports_dir=reports, clock=clock)
    events = stream.events[:-1] if stop_before_result else stream.events
    for event in events:
        progress.event(event)
    return progress, out


@pytest.fixture
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(djm.shutil, "get_terminal_size", lambda *_a: os.terminal_size((200, 50)))


def progress_after_an_earlier_backup(tmp_path: Path) -> tuple[Any, Any, Any]:
    """A live progress display whose project has an earlier report: a 100 s backup of 500 MiB."""
    (tmp_path / "acme").mkdir()
    steps = [{"step": "backup", "host": "db1", "seconds": 100.0, "status": "changed", "db_size_bytes": 500 * 2**20}]
    (tmp_path / "acme" / "earlier.json").write_text(json.dumps({"run_id": "earlier", "long_steps": steps}))
    clock = Clock()
    progress, out = progress_of(backup_stream(), tmp_path, live=True, clock=clock)
    return progress, out, clock


def test_a_long_step_shows_a_bar_against_the_earlier_run_on_a_terminal(tmp_path: Path, wide_terminal: None) -> None:
    progress, out, clock = progress_after_an_earlier_backup(tmp_path)
    clock.now += 50
    progress.tick()  # the runner's cancel_callback, while ansible is silent
    shown = out.getvalue().rsplit("\r\033[K", 1)[-1]
    assert shown == (
        "    50s  backup       db1  [#####...............] 50s of ~200s  "
        "estimate: run earlier took 100 s at 500 MiB, scaled to 1000 MiB; database 1000 MiB, dump ~300 MiB"
    )
    clock.now += 0.5
    progress.tick()
    assert out.getvalue().rsplit("\r\033[K", 1)[-1] == shown  # at most one redraw a second
    clock.now += 250
    progress.tick()
    assert "[####################] 300s of ~200s (over the estimate)" in out.getvalue().rsplit("\r\033[K", 1)[-1]
    progress.event(backup_stream().events[-1])  # the dump's result: the step is over
    assert_nothing_drawn_after_the_step(progress, out, clock)


def assert_nothing_drawn_after_the_step(progress: Any, out: Any, clock: Any, late: dict[str, Any] | None = None) -> None:
    """The step's result ended it: no step left, and neither a late event nor a tick draws again."""
    assert progress.steps == {}
    before = out.getvalue()
    if late is not None:
        progress.event(late)
    clock.now += 5
    progress.tick()
    assert out.getvalue() == before


def test_a_long_step_without_an_earlier_run_shows_its_time_only(tmp_path: Path, wide_terminal: None) -> None:
    clock = Clock()
    progress, out = progress_of(backup_stream(), tmp_path, live=True, clock=clock)
    clock.now += 12
    progress.tick()
    shown = out.getvalue().rsplit("\r\033[K", 1)[-1]
    # No bar, no invented figure: the time, and the sizes the preflight measured.
    assert shown == (
        "    12s  backup       db1  12s (no earlier run of this step to estimate from); database 1000 MiB, dump ~300 MiB"
    )


def test_no_bar_and_nothing_extra_off_a_terminal(tmp_path: Path) -> None:
    (tmp_path / "acme").mkdir()
    steps = [{"step": "backup", "host": "db1", "seconds": 100.0, "status": "changed"}]
    (tmp_path / "acme" / "earlier.json").write_text(json.dumps({"run_id": "earlier", "long_steps": steps}))
    clock = Clock()
    _, plain = progress_of(backup_stream(), tmp_path, live=False, clock=clock)
    progress, out = progress_of(backup_stream(), tmp_path, live=False, clock=clock)
    clock.now += 50
    progress.tick()
    assert out.getvalue() == plain.getvalue()
    assert "estimate" not in out.getvalue() and "\r" not in out.getvalue() and "#" not in out.getvalue()


def retry(host: str, task: str, stdout: str, rc: int = 0, attempts: int = 1) -> dict[str, Any]:
    """A runner_retry event: one poll of an until loop that has not ended (the result of that attempt)."""
    res = {"rc": rc, "stdout": stdout, "attempts": attempts, "retries": 100, "changed": False}
    return {"event": "runner_retry", "event_data": {"host": host, "task": task, "res": res}}


def polled(written: int, done: bool = False) -> str:
    """What pg_snapshot_backup.py progress prints."""
    return json.dumps({"changed": False, "id": "x", "bytes_written": written, "files": 3, "where": "partial", "finished": done})


def test_bytes_written_are_read_from_the_progress_programs_output_and_nothing_else() -> None:
    assert djm_report.bytes_written({"rc": 0, "stdout": polled(150 * 2**20)}) == 150 * 2**20
    assert djm_report.bytes_written({"rc": 0, "stdout": polled(0)}) == 0
    assert djm_report.bytes_written({"rc": 1, "stdout": polled(5)}) is None  # the reader failed: no figure
    assert djm_report.bytes_written({"rc": 0, "stdout": "Traceback (most recent call last):"}) is None
    assert djm_report.bytes_written({"rc": 0, "stdout": "[1, 2]"}) is None
    assert djm_report.bytes_written({"rc": 0, "stdout": json.dumps({"bytes_written": True})}) is None
    assert djm_report.bytes_written({"rc": 0, "stdout": json.dumps({"bytes_written": -3})}) is None
    assert djm_report.bytes_written({"rc": 0, "stdout": json.dumps({"bytes_written": "12"})}) is None
    assert djm_report.bytes_written({"rc": 0}) is None
    assert djm_report.bytes_written({}) is None


def dump_polled(progress: Any, out: Any, clock: Any, seconds: int, written: int, attempts: int = 1) -> str:
    """`seconds` later, db1's dump watch reports `written` bytes: the line shown then."""
    clock.now += seconds
    progress.event(retry("db1", DUMP_TASK, polled(written), attempts=attempts))
    return str(out.getvalue().rsplit("\r\033[K", 1)[-1])


def test_a_dump_shows_its_bytes_against_the_preflights_dump_estimate(tmp_path: Path, wide_terminal: None) -> None:
    progress, out, clock = progress_after_an_earlier_backup(tmp_path)
    shown = dump_polled(progress, out, clock, 30, 150 * 2**20)
    # Bytes replace the time estimate: the preflight's expected dump is the whole, the database beside it.
    assert shown == (
        "    30s  backup       db1  [##########..........] 150 MiB of ~300 MiB (50%)  30s  "
        "expected dump: pg_backup's preflight estimate; database 1000 MiB"
    )
    shown = dump_polled(progress, out, clock, 30, 450 * 2**20, attempts=2)
    assert "[####################] 450 MiB of ~300 MiB (150%, over the estimate)  60s" in shown
    # A poll whose reader failed or printed no figure keeps the last figure seen, and fails nothing.
    progress.event(retry("db1", DUMP_TASK, "Traceback", rc=1, attempts=3))
    assert "450 MiB of ~300 MiB" in out.getvalue().rsplit("\r\033[K", 1)[-1]
    # Another host's or another task's retries are not this dump's.
    progress.event(retry("db2", DUMP_TASK, polled(9 * 2**20)))
    progress.event(retry("db1", "Wait for the port", polled(9 * 2**20)))
    assert progress.steps[("db1", DUMP_TASK)]["bytes"] == 450 * 2**20 and ("db2", DUMP_TASK) not in progress.steps
    progress.event(backup_stream().events[-1])  # the watch's result: the step is over
    assert_nothing_drawn_after_the_step(progress, out, clock, late=retry("db1", DUMP_TASK, polled(10)))


def test_a_dump_without_a_dump_estimate_is_measured_against_the_database_and_says_so(tmp_path: Path, wide_terminal: None) -> None:
    clock = Clock()
    progress, out = progress_of(backup_stream(), tmp_path, live=True, clock=clock)
    progress.timeline.estimated_dump_bytes = None
    shown = dump_polled(progress, out, clock, 12, 100 * 2**20)
    assert shown == (
        "    12s  backup       db1  [##..................] 100 MiB of ~1000 MiB (10%)  12s  "
        "of the database's size: a compressed dump is smaller"
    )
    progress.timeline.db_size_bytes = None  # no size at all: the bytes, beside the time
    clock.now += 1
    progress.tick()
    shown = out.getvalue().rsplit("\r\033[K", 1)[-1]
    assert shown == "    13s  backup       db1  13s (no earlier run of this step to estimate from); 100 MiB written"


def test_retries_print_nothing_off_a_terminal(tmp_path: Path) -> None:
    clock = Clock()
    _, plain = progress_of(backup_stream(), tmp_path, live=False, clock=clock)
    progress, out = progress_of(backup_stream(), tmp_path, live=False, clock=clock)
    clock.now += 50
    progress.event(retry("db1", DUMP_TASK, polled(150 * 2**20)))
    assert out.getvalue() == plain.getvalue()


def test_a_dump_watch_is_one_long_step_and_its_retries_are_no_results(tmp_path: Path) -> None:
    stream = backup_stream(dump_seconds=60.0)
    stream.events[-1:-1] = [retry("db1", DUMP_TASK, polled(n)) for n in (0, 10, 20)]
    timeline = timeline_of(stream)
    assert [s["step"] for s in timeline.long_steps] == ["backup"] and timeline.long_steps[0]["seconds"] == 60.0
    assert timeline.stages[-1]["hosts"]["db1"]["ok"] + timeline.stages[-1]["hosts"]["db1"]["changed"] == 2
    assert timeline.errors == []


def test_status_history_shows_each_run_once_as_its_newest_line_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    history = tmp_path / "build" / "deploys" / "acme" / "history.jsonl"
    history.parent.mkdir(parents=True)
    lines = [
        {"run_id": "r1", "playbook": "migrate", "result": "succeeded"},
        {"run_id": "r2", "playbook": "migrate", "result": "succeeded"},
        {"run_id": "r2", "playbook": "migrate", "result": "rolled_back"},  # rollback.yml undid r2 later
        {"run_id": "r3", "playbook": "migrate", "result": "failed"},
    ]
    history.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    monkeypatch.setattr(djm, "REPO", tmp_path)
    assert [(r["run_id"], r["result"]) for r in djm.history_tail("acme")] == [
        ("r3", "failed"),
        ("r2", "rolled_back"),
        ("r1", "succeeded"),
    ]
    assert [r["run_id"] for r in djm.history_tail("acme", count=2)] == ["r3", "r2"]
    assert djm.history_tail("other") == []


def test_event_log_default_directory_is_build_events_beside_the_ansible_cfg(tmp_path: Path) -> None:
    """Without DJM_EVENTS_DIR the log goes to build/events beside the ansible.cfg in use: the option's
    documented default once was a sentence, which Ansible took as the directory's name."""
    config = tmp_path / "ansible.cfg"
    config.write_text(
        "[defaults]\n"
        f"callback_plugins = {REPO / 'plugins' / 'callback'}\n"
        "callbacks_enabled = djm_events\n"
        "interpreter_python = auto_silent\n"
    )
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        "- name: Preflight - nothing\n  hosts: localhost\n  gather_facts: false\n"
        "  tasks:\n    - name: Say hello\n      ansible.builtin.debug:\n        msg: hello\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "DJM_EVENTS_"))}
    env.update(ANSIBLE_CONFIG=str(config), PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    work = tmp_path / "elsewhere"
    work.mkdir()
    command = ["ansible-playbook", "-c", "local", "-i", "localhost,", "-e", f"ansible_python_interpreter={sys.executable}"]
    proc = subprocess.run([*command, str(playbook)], env=env, capture_output=True, text=True, timeout=300, check=False, cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl"))
    assert len(files) == 1 and files[0].startswith("build/events/_unnamed/"), files
