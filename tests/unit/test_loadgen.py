"""scripts/loadgen.py against a small in-process imitation of the fixture app's endpoints, and its
`verify` against the throwaway PostgreSQL (tests/conftest.py: pg_cluster)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import gen_data  # noqa: E402
import loadgen  # noqa: E402

SCRIPT = REPO / "scripts" / "loadgen.py"
SLUGS = loadgen.gen_data_page_slugs(1)
CUSTOMERS = range(1, 21)
FIELDS = {"seq", "t_start", "duration_ms", "wait_ms", "kind", "method", "path", "status", "ok", "error", "order_id", "headers"}


# --- the imitation app ------------------------------------------------------------------------------------


@dataclass
class FakeApp:
    """/pages/<slug>, /smoke/profile/<id>, POST /smoke/checkout, with failures on demand."""

    slugs: set[str] = field(default_factory=lambda: set(SLUGS))
    customers: set[int] = field(default_factory=lambda: set(CUSTOMERS))
    fail_checkouts: tuple[float, float] = (0.0, 0.0)  # epoch window: checkouts answer 500
    drop_profiles: tuple[float, float] = (0.0, 0.0)  # epoch window: profile connections closed unanswered
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    hits: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status; 0 = dropped)
    orders: list[int] = field(default_factory=list)
    next_order: int = 1000

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any] | None]:
        now = time.time()
        parts = path.strip("/").split("/")
        if method == "GET" and len(parts) == 2 and parts[0] == "pages":
            return (200 if parts[1] in self.slugs else 404), {"slug": parts[1]}
        if method == "GET" and len(parts) == 3 and parts[:2] == ["smoke", "profile"]:
            if self.drop_profiles[0] <= now < self.drop_profiles[1]:
                return 0, None
            return (200 if int(parts[2]) in self.customers else 404), {"customer_id": int(parts[2])}
        if method == "POST" and parts == ["smoke", "checkout"]:
            if self.fail_checkouts[0] <= now < self.fail_checkouts[1]:
                return 500, {"error": "database is being restored"}
            if json.loads(body)["customer_id"] not in self.customers:
                return 404, {"error": "no such customer"}
            with self.lock:
                self.next_order += 1
                self.orders.append(self.next_order)
                return 201, {"order_id": self.next_order, "payment_id": 1}
        return 404, {"error": "not found"}


class Handler(BaseHTTPRequestHandler):
    server: Server

    def handle_one(self, method: str) -> None:
        app = self.server.app
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if app.delay:
            time.sleep(app.delay)
        status, doc = app.answer(method, self.path, body)
        with app.lock:
            app.hits.append((method, self.path, status))
        if status == 0:
            self.close_connection = True
            return  # no response at all: the client sees the connection closed
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Release", "vtest")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.handle_one("GET")

    def do_POST(self) -> None:
        self.handle_one("POST")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, app: FakeApp) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.app = app

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and left is expected here


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[Server] = []

    def start(app: FakeApp) -> str:
        server = Server(app)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_main(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = loadgen.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- input checks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://8.8.8.8/",
        "http://192.168.1.1:8080",
        "http://example.com",
        "http://localhost.example.com/",
        "http://10.91.0.1/",
        "http://172.17.0.2/",
        "http://[2001:db8::1]/",
        "http://[::ffff:8.8.8.8]/",
        "ftp://127.0.0.1/",
        "http://user:pw@127.0.0.1/",
        "127.0.0.1:8080",
    ],
)
def test_refuses_targets_that_are_not_local(capsys: Any, tmp_path: Path, url: str) -> None:
    argv = ["run", "--url", url, "--out", str(tmp_path / "x.jsonl"), "--no-preflight", "--rate", "1", "--duration", "0.5"]
    code, _, err = run_main(capsys, *argv)  # (rate and duration kept tiny should the refusal ever break)
    assert code == 2
    assert err.startswith("loadgen: refusing") and err.count("\n") == 1, err
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize(
    ("url", "allow"),
    [
        ("http://127.0.0.1:8080", []),
        ("http://127.9.9.9/app/", []),
        ("http://localhost:8080", []),
        ("http://[::1]:8080", []),
        ("http://10.90.0.10", []),
        ("https://10.90.200.1:8443", []),
        ("http://192.168.1.1:8080", ["192.168.1.0/24"]),
        ("http://[fd00::5]/", ["fd00::/64"]),
    ],
)
def test_accepts_loopback_fleet_and_allowed_private_nets(url: str, allow: list[str]) -> None:
    target = loadgen.check_target(url, [loadgen.parse_allow_net(net) for net in allow])
    assert target.port in (80, 443, 8080, 8443)
    assert target.prefix in ("", "/app")


@pytest.mark.parametrize("net", ["8.8.8.0/24", "0.0.0.0/0", "10.0.0.0/7", "192.168.1.1/16", "not-a-net", "100.64.0.0/10"])
def test_allow_net_must_be_a_private_range(capsys: Any, tmp_path: Path, net: str) -> None:
    with pytest.raises(SystemExit) as exc:
        loadgen.main(["run", "--url", "http://8.8.8.8", "--allow-net", net, "--out", str(tmp_path / "x.jsonl")])
    assert exc.value.code == 2
    assert "--allow-net" in capsys.readouterr().err


def test_parse_mix() -> None:
    assert loadgen.parse_mix("browse=60,profile=25,checkout=15") == {"browse": 60, "profile": 25, "checkout": 15}
    assert loadgen.parse_mix(" checkout = 1 ") == {"browse": 0, "profile": 0, "checkout": 1}


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ("browse=60,shop=5", "unknown kind 'shop'"),
        ("browse", "not KIND=WEIGHT"),
        ("browse=-1,profile=2", "must be >= 0"),
        ("browse=0,profile=0", "add up to 0"),
        ("browse=1,browse=2", "given twice"),
        ("browse=lots", "not a number"),
        ("browse=nan", "must be >= 0"),
    ],
)
def test_mix_errors_exit_2_with_one_line(capsys: Any, tmp_path: Path, mix: str, message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        loadgen.main(["run", "--mix", mix, "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--rate", "0"),
        ("--rate", "1000"),
        ("--duration", "-1"),
        ("--duration", "99999"),
        ("--customer-ids", "0-5"),
        ("--customer-ids", "9-3"),
        ("--page-slugs", "a b"),
    ],
)
def test_bad_bounds_exit_2(capsys: Any, tmp_path: Path, option: str, value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        loadgen.main(["run", option, value, "--out", str(tmp_path / "x.jsonl")])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def test_customer_ids_forms() -> None:
    assert list(loadgen.parse_ids("1-20")) == list(range(1, 21))
    assert list(loadgen.parse_ids("3,5,8-9")) == [3, 5, 8, 9]


def test_bad_path_template_and_existing_stop_file(capsys: Any, tmp_path: Path) -> None:
    out = str(tmp_path / "x.jsonl")
    code, _, err = run_main(capsys, "run", "--out", out, "--profile-path", "/p/{id}", "--no-preflight")
    assert code == 2 and "--profile-path" in err
    stop = tmp_path / "stop"
    stop.touch()
    code, _, err = run_main(capsys, "run", "--out", out, "--stop-file", str(stop), "--no-preflight")
    assert code == 2 and "exists already" in err


# --- the defaults match gen_data's data -------------------------------------------------------------------


def test_default_slugs_and_customers_exist_in_generated_data(pg_cluster: Any) -> None:
    """Load gen_data's own COPY rows (smallest and a larger size) and look for every default target in them."""
    dsn = pg_cluster.createdb("loadgen_gen_data")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE cms_pages (id int PRIMARY KEY, slug text UNIQUE, title text, body text, published bool,"
            " created_at timestamptz, updated_at timestamptz)"
        )
        conn.execute(
            "CREATE TABLE customers (id int PRIMARY KEY, email text, first_name text, last_name text, phone text, street text,"
            " city text, postal_code text, country text, legacy_password text, user_id int, created_at timestamptz)"
        )
        conn.execute(
            "CREATE TABLE profiles (id int, bio text, birth_date date, newsletter bool, preferences jsonb,"
            " updated_at timestamptz, customer_id int)"
        )
    for size in ("1MB", "50MB"):
        plan = gen_data.Plan.for_size(gen_data.parse_size(size), 1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE cms_pages, customers, profiles")
        gen_data.load_chunk(dsn, asdict(plan), "cms_pages", 0, 1, min(plan.pages, gen_data.CHUNK) + 1)
        if size == "1MB":
            gen_data.load_chunk(dsn, asdict(plan), "customers", 0, 1, min(plan.customers, gen_data.CHUNK) + 1)
        with psycopg.connect(dsn) as conn:
            published = {r[0] for r in conn.execute("SELECT slug FROM cms_pages WHERE published").fetchall()}
            unpublished = {r[0] for r in conn.execute("SELECT slug FROM cms_pages WHERE NOT published").fetchall()}
            customers = {r[0] for r in conn.execute("SELECT id FROM customers").fetchall()}
        assert len(SLUGS) >= 5
        assert set(SLUGS) <= published, size
        assert unpublished and not set(SLUGS) & unpublished
        if size == "1MB":  # the smallest data gen_data makes
            assert set(CUSTOMERS) <= customers
    assert set(loadgen.gen_data_page_slugs(2)).isdisjoint(SLUGS)


# --- running the load -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: Any) -> Iterator[tuple[list[dict[str, Any]], dict[str, Any], FakeApp, int]]:
    """2.5 s at 40/s: checkouts answer 500 from 0.7 s to 1.4 s, profile connections drop from 1.2 s to 1.8 s."""
    tmp = tmp_path_factory.mktemp("mixed")
    start = time.time()
    app = FakeApp(fail_checkouts=(start + 0.7, start + 1.4), drop_profiles=(start + 1.2, start + 1.8))
    server = Server(app)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out, summary_file = tmp / "load.jsonl", tmp / "summary.json"
    argv = ["run", "--url", f"http://127.0.0.1:{server.server_address[1]}", "--out", str(out), "--summary", str(summary_file)]
    argv += ["--rate", "40", "--duration", "2.5", "--mix", "browse=40,profile=30,checkout=30", "--no-preflight"]
    code = loadgen.main([*argv, "--fail-on-errors"])
    yield records(out), json.loads(summary_file.read_text()), app, code
    server.shutdown()
    server.server_close()


def test_every_request_is_recorded(mixed_run: tuple[list[dict[str, Any]], dict[str, Any], FakeApp, int]) -> None:
    recs, summary, app, _ = mixed_run
    assert all(set(r) == FIELDS for r in recs)
    assert sorted(r["seq"] for r in recs) == list(range(len(recs)))
    assert summary["total"] == len(recs) == len(app.hits)
    assert sorted((r["method"], r["path"], r["status"]) for r in recs) == sorted(app.hits)
    assert {r["kind"] for r in recs} == {"browse", "profile", "checkout"}
    assert all(r["headers"] == {"X-Release": "vtest"} for r in recs if r["status"])
    assert summary["headers_seen"] == {"X-Release": {"vtest": sum(1 for r in recs if r["status"])}}
    browsed = {r["path"].rsplit("/", 1)[1] for r in recs if r["kind"] == "browse"}
    assert browsed <= set(SLUGS)


def test_rate_and_duration_are_respected(mixed_run: tuple[list[dict[str, Any]], dict[str, Any], FakeApp, int]) -> None:
    recs, summary, _, _ = mixed_run
    assert 0.6 * 100 <= len(recs) <= math.ceil(40 * 2.5)  # loose: the machine is shared
    assert 25 <= summary["requests_per_s"] <= 50
    starts = [r["t_start"] for r in recs]
    assert max(starts) - min(starts) < 2.5
    assert summary["window"]["seconds"] < 2.5 + 5
    assert summary["stopped_by"] == "duration"


def test_failures_are_counted_by_kind_status_and_time(
    mixed_run: tuple[list[dict[str, Any]], dict[str, Any], FakeApp, int],
) -> None:
    recs, summary, app, code = mixed_run
    assert code == 1  # --fail-on-errors
    served_500 = sum(1 for m, _, s in app.hits if m == "POST" and s == 500)
    dropped = sum(1 for _, _, s in app.hits if s == 0)
    assert served_500 > 0 and dropped > 0
    assert summary["failures_by_kind"] == {"checkout": {"500": served_500}, "profile": {"0": dropped}}
    assert summary["failed"] == served_500 + dropped == sum(1 for r in recs if not r["ok"])
    assert summary["by_kind"]["browse"]["failed"] == 0
    assert any("database is being restored" in e for e in summary["errors"])
    # Failures only around their windows (0.7 s .. 1.8 s after the fixture started), loosely.
    first, last = summary["first_failure"], summary["last_failure"]
    assert min(r["t_start"] for r in recs) < first <= last < max(r["t_start"] for r in recs)
    assert last - first < 1.1 + 1.5
    timeline = summary["failure_timeline"]
    assert timeline and all(s["failed"] > 0 for s in timeline)
    assert sum(s["failed"] for s in timeline) == summary["failed"]
    assert int(first) == timeline[0]["second"] and int(last) == timeline[-1]["second"]
    assert sum(s["total"] for s in summary["timeline"]) == summary["total"]
    for kind in ("browse", "profile", "checkout"):
        latency = summary["by_kind"][kind]["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]


def test_only_answered_checkouts_are_acknowledged(mixed_run: tuple[list[dict[str, Any]], dict[str, Any], FakeApp, int]) -> None:
    recs, summary, app, _ = mixed_run
    acknowledged = [r["order_id"] for r in recs if r["order_id"] is not None]
    assert sorted(acknowledged) == sorted(app.orders)
    assert summary["orders_acknowledged"] == len(app.orders) > 0
    assert all(r["ok"] and r["status"] == 201 for r in recs if r["order_id"] is not None)
    assert all(r["order_id"] is None for r in recs if r["status"] == 500)


def test_a_checkout_answer_without_order_id_is_a_failure(capsys: Any, serve: Any, tmp_path: Path) -> None:
    url = serve(FakeApp())
    out = tmp_path / "c.jsonl"
    argv = ["run", "--url", url, "--out", str(out), "--rate", "20", "--duration", "0.5", "--mix", "checkout=1"]
    code, text, _ = run_main(capsys, *argv, "--order-id-field", "confirmation", "--fail-on-errors")
    recs = records(out)
    assert code == 1
    assert recs and all(r["status"] == 201 and not r["ok"] and r["order_id"] is None for r in recs)
    assert all("without an integer 'confirmation'" in r["error"] for r in recs)
    assert f"{len(recs)} failed, 0 orders acknowledged" in text


def test_summary_subcommand_recomputes_the_same(
    capsys: Any, mixed_run: tuple[list[dict[str, Any]], dict[str, Any], FakeApp, int], tmp_path: Path
) -> None:
    recs, summary, _, _ = mixed_run
    path = tmp_path / "copy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    code, out, _ = run_main(capsys, "summary", str(path), "--json")
    again = json.loads(out)
    assert code == 0
    assert {k: v for k, v in again.items() if k != "file"} == {k: summary[k] for k in again if k != "file"}


def test_summary_percentiles_and_timeline() -> None:
    recs = [
        {"t_start": 1000.0 + i / 10, "duration_ms": float(i + 1), "kind": "browse", "status": 500 if 30 <= i < 40 else 200}
        for i in range(100)
    ]
    for r in recs:
        r["ok"] = r["status"] == 200
    summary = loadgen.summarize(recs)
    assert summary["by_kind"]["browse"]["latency_ms"] == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    assert summary["failure_timeline"] == [{"second": 1003, "total": 10, "failed": 10}]
    assert (summary["first_failure"], summary["last_failure"]) == (1003.0, 1003.9)
    assert summary["requests_per_s"] == pytest.approx(10.0)
    assert summary["window"] == {"start": 1000.0, "end": pytest.approx(1010.0), "seconds": pytest.approx(10.0)}
    assert len(summary["timeline"]) == 10


def test_slow_server_shows_as_failures_not_as_a_lower_rate(capsys: Any, serve: Any, tmp_path: Path) -> None:
    url = serve(FakeApp(delay=2.0))
    out = tmp_path / "slow.jsonl"
    started = time.monotonic()
    code, _, _ = run_main(
        capsys, "run", "--url", url, "--out", str(out), "--rate", "20", "--duration", "1.5", "--timeout", "0.4",
        "--workers", "2", "--no-preflight",
    )  # fmt: skip
    elapsed = time.monotonic() - started
    recs = records(out)
    assert code == 0  # no --fail-on-errors
    assert 0.6 * 30 <= len(recs) <= 30  # open loop: still about rate x duration requests
    assert all(not r["ok"] and r["status"] == 0 for r in recs)
    errors = {r["error"].split(":")[0] for r in recs}
    assert "TimeoutError" in errors or "timeout" in " ".join(errors)
    assert any(r["error"].startswith("not sent") for r in recs)  # 2 workers cannot keep 20/s of 0.4 s requests
    assert elapsed < 1.5 + 6  # bounded: duration + timeouts, loosely


def test_stop_file_ends_the_run_early(capsys: Any, serve: Any, tmp_path: Path) -> None:
    url = serve(FakeApp())
    stop, out, summary = tmp_path / "stop", tmp_path / "s.jsonl", tmp_path / "s.json"
    threading.Timer(0.8, stop.touch).start()
    started = time.monotonic()
    code, text, _ = run_main(
        capsys, "run", "--url", url, "--out", str(out), "--summary", str(summary), "--rate", "20", "--duration", "30",
        "--stop-file", str(stop), "--fail-on-errors",
    )  # fmt: skip
    assert code == 0
    assert time.monotonic() - started < 8
    doc = json.loads(summary.read_text())
    assert doc["stopped_by"] == "stop-file"
    assert 3 <= doc["total"] == len(records(out)) < 20 * 8
    assert doc["failed"] == 0
    assert "0 failed" in text


def test_preflight_refuses_data_that_does_not_match(capsys: Any, serve: Any, tmp_path: Path) -> None:
    url = serve(FakeApp(customers=set(range(1, 6))))
    out = tmp_path / "p.jsonl"
    code, _, err = run_main(capsys, "run", "--url", url, "--out", str(out), "--duration", "1")
    assert code == 2
    assert "/smoke/profile/20" in err and "404" in err
    assert not out.exists()
    code, _, _ = run_main(capsys, "run", "--url", url, "--out", str(out), "--duration", "1", "--customer-ids", "1-5")
    assert code == 0
    assert records(out)


def test_sigterm_stops_the_cli_with_a_summary(serve: Any, tmp_path: Path) -> None:
    url = serve(FakeApp())
    out, summary = tmp_path / "t.jsonl", tmp_path / "t.json"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "run", "--url", url, "--out", str(out), "--summary", str(summary), "--duration", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not (out.exists() and out.read_text().count("\n") >= 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    doc = json.loads(summary.read_text())
    assert doc["stopped_by"] == "signal"
    assert doc["total"] == len(records(out)) >= 3
    assert "requests in" in stdout


def test_help_documents_the_formats() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for word in ("t_start", "duration_ms", "order_id", "failure_timeline", "Exit codes", "/smoke/checkout", "10.90.0.0/16"):
        assert word in result.stdout


# --- verify -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orders_db(pg_cluster: Any) -> str:
    dsn = pg_cluster.createdb("loadgen_verify")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, note text)")
        conn.execute("CREATE SCHEMA shop")
        conn.execute('CREATE TABLE shop.purchases ("order_no" int PRIMARY KEY)')
    return dsn


def store_orders(dsn: str, ids: list[int], table: str = "orders", column: str = "id") -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {table}")
        conn.execute(f"INSERT INTO {table} ({column}) SELECT unnest(%s::bigint[])", [ids])


@pytest.mark.parametrize("through", ["dsn", "psql"])
def test_verify_finds_every_acknowledged_order_or_names_the_missing(
    capsys: Any,
    pg_cluster: Any,
    orders_db: str,
    mixed_run: tuple[list[dict[str, Any]], dict[str, Any], FakeApp, int],
    tmp_path: Path,
    through: str,
) -> None:
    recs, _, app, _ = mixed_run
    jsonl = tmp_path / "load.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    source = ["--dsn", orders_db]
    if through == "psql":
        source = ["--psql-cmd", f"{pg_cluster.bin('psql')} -h 127.0.0.1 -p {pg_cluster.port} -U postgres -d loadgen_verify"]
    acknowledged = sorted(app.orders)
    assert len(acknowledged) >= 3

    store_orders(orders_db, [*acknowledged, 1, 2, 3])  # extra rows do not matter
    code, out, _ = run_main(capsys, "verify", str(jsonl), *source)
    assert code == 0
    assert f"{len(acknowledged)} acknowledged orders, {len(acknowledged)} found, 0 missing in orders.id" in out

    lost = [acknowledged[0], acknowledged[-1]]
    store_orders(orders_db, [i for i in acknowledged if i not in lost])
    code, out, _ = run_main(capsys, "verify", str(jsonl), *source, "--json")
    assert code == 1
    assert json.loads(out) == {
        "acknowledged": len(acknowledged),
        "found": len(acknowledged) - 2,
        "missing": lost,
        "table": "orders.id",
    }


def test_verify_other_table_empty_run_and_bad_names(capsys: Any, orders_db: str, tmp_path: Path) -> None:
    jsonl = tmp_path / "load.jsonl"
    rows = [{"t_start": 1.0, "kind": "checkout", "status": 201, "ok": True, "order_id": i} for i in (7, 8)]
    rows.append({"t_start": 2.0, "kind": "checkout", "status": 500, "ok": False, "order_id": None})
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store_orders(orders_db, [7, 8], "shop.purchases", "order_no")
    code, out, _ = run_main(
        capsys, "verify", str(jsonl), "--dsn", orders_db, "--table", "shop.purchases", "--id-column", "order_no"
    )
    assert code == 0 and "2 acknowledged orders, 2 found, 0 missing in shop.purchases.order_no" in out
    code, out, _ = run_main(capsys, "verify", str(jsonl), "--dsn", orders_db)  # orders holds none of them
    assert code == 1 and "missing: 7, 8" in out

    nothing = tmp_path / "nothing.jsonl"
    nothing.write_text(json.dumps(rows[-1]) + "\n")
    code, _, err = run_main(capsys, "verify", str(nothing), "--dsn", orders_db)
    assert code == 1 and "--min-orders" in err
    code, _, err = run_main(capsys, "verify", str(jsonl), "--dsn", orders_db, "--table", "orders; DROP TABLE orders")
    assert code == 2 and "--table" in err
    (tmp_path / "bad.jsonl").write_text("not json\n")
    code, _, err = run_main(capsys, "verify", str(tmp_path / "bad.jsonl"), "--dsn", orders_db)
    assert code == 2 and "bad.jsonl:1" in err


@pytest.mark.parametrize(
    "dsn",
    [
        "host=127.0.0.1 port={port} user=postgres password=Sup3rSecret-pw dbname=no_such_db connect_timeout=5",
        "postgresql://postgres:Sup3rSecret-pw@127.0.0.1:{port}/no_such_db",
    ],
)
def test_verify_never_prints_the_password(capsys: Any, pg_cluster: Any, tmp_path: Path, dsn: str) -> None:
    jsonl = tmp_path / "load.jsonl"
    jsonl.write_text(json.dumps({"t_start": 1.0, "kind": "checkout", "status": 201, "ok": True, "order_id": 5}) + "\n")
    code, out, err = run_main(capsys, "verify", str(jsonl), "--dsn", dsn.format(port=pg_cluster.port))
    assert code == 2
    assert "no_such_db" in err  # the error is reported...
    assert "Sup3rSecret" not in out + err  # ...without the password
