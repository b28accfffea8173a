#!/usr/bin/env python3
"""Steady, bounded, mixed HTTP load against ONE local base URL, every request recorded; then proof
that every acknowledged order is in the database.

    loadgen.py run --url http://127.0.0.1:8080 --out load.jsonl [--summary load.json]
                   [--rate 20] [--duration 60] [--stop-file PATH] [--timeout 5] [--workers 16]
                   [--mix browse=60,profile=25,checkout=15] [--customer-ids 1-20]
                   [--page-slugs SLUG,... | --data-seed 1] [--browse-path /pages/{slug}]
                   [--profile-path /smoke/profile/{customer_id}] [--checkout-path /smoke/checkout]
                   [--order-id-field order_id] [--record-header X-Release ...] [--allow-net CIDR ...]
                   [--seed 1] [--no-preflight] [--fail-on-errors]
    loadgen.py summary load.jsonl [--json]
    loadgen.py verify load.jsonl (--dsn DSN | --psql-cmd CMD) [--table orders] [--id-column id]
                   [--min-orders 1] [--json]

run
  Open-loop traffic: request n is due at start + n/rate whatever the server does, so a slow server
  shows up as latency and failures, never as a lower rate. A small thread pool sends them, a new
  connection per request (no stale keep-alive connection can fail a request); a request that finds
  every worker busy for longer than --timeout is recorded as failed ("not sent") rather than
  queued forever. Redirects are not followed. It stops at --duration (a hard bound, also on the
  number of requests: ceil(rate x duration)), or earlier when --stop-file appears or on
  SIGTERM/SIGINT, then waits for the requests in flight (each bounded by --timeout).

  Kinds (weights from --mix; a kind left out gets weight 0):
    browse    GET  --browse-path   (default /pages/{slug}: a published CMS page)
    profile   GET  --profile-path  (default /smoke/profile/{customer_id})
    checkout  POST --checkout-path (default /smoke/checkout), body {"customer_id": N, "provider": "loadgen"};
              the order is acknowledged only when the status is 2xx and the JSON body carries an
              integer --order-id-field (default order_id); any other answer is a failed checkout.
  The defaults are the fixture app's (examples/acme) endpoints and scripts/gen_data.py's data:
  customers 1-20 exist whatever the size (gen_data makes at least 20, ids from 1), and the page
  slugs are the published pages among ids 1-10 that gen_data generates for --data-seed (it makes
  at least 10; their slugs depend on the seed only). Point it at another project with the path
  options, --customer-ids and --page-slugs. Before the run, a preflight GETs every page slug and
  the first and last customer id (not recorded) and refuses to start (exit 2) if one fails.

  Only loopback (127.0.0.0/8, ::1, localhost) and the local test fleet's podman network
  (10.90.0.0/16) are accepted as targets, plus --allow-net ranges, which must themselves be
  private (10/8, 172.16/12, 192.168/16, fc00::/7). Host names other than localhost are refused,
  never resolved.

  --out gets one JSON object per line, for every request (written as each one ends):
    seq          0, 1, 2 ... in scheduling order (contiguous: a gap means a lost record)
    t_start      epoch seconds (float) when the request was due to be sent
    duration_ms  from t_start to the end of the response (includes wait_ms)
    wait_ms      time spent waiting for a free worker (about 0 unless the client is saturated)
    kind         browse | profile | checkout
    method, path the request (path includes the base URL's path)
    status       HTTP status, 0 when no response came (connection refused/reset, timeout, not sent)
    ok           2xx/3xx with a complete body (checkout: acknowledged)
    error        short text when not ok, else null
    order_id     the acknowledged order id (checkout only), else null
    headers      {name: value} of the --record-header headers the response carried (default
                 X-Release, X-Backend, X-Served-By; {} when the app sends none)

  The summary (stdout, and --summary FILE as JSON) is computed from that file; its keys:
    file, total, ok, failed, orders_acknowledged,
    window {start, end, seconds}, requests_per_s,
    by_kind {kind: {total, failed, latency_ms {p50, p95, p99, max}}} (latency over all requests),
    failures_by_kind {kind: {status: count}}, failures_by_status {status: count},
    errors {error text: count} (the 10 most frequent),
    first_failure, last_failure (epoch t_start or null),
    failure_timeline [{second, total, failed}] for each epoch second with a failure,
    timeline [{second, total, failed}] for every second of the window,
    headers_seen {header: {value: count}};
    and, from run: url, rate, duration, mix, stopped_by (duration | stop-file | signal).

summary
  Recomputes and prints the summary of a JSONL file.

verify
  Reads the acknowledged order ids of a JSONL file and checks, in ONE query
  (SELECT id FROM orders WHERE id = ANY(...)), that each of them is in the database: through
  psycopg 3 with --dsn (libpq string or URI; empty means the PG* environment variables), or
  through psql with --psql-cmd, a psql command line that reads SQL on stdin, e.g.
  "podman exec -i db1 runuser -u postgres -- psql -d acme" (loadgen appends -X -q -A -t
  -v ON_ERROR_STOP=1). Prints the found and missing counts and the missing ids. The DSN and its
  password are never printed.

Exit codes: 0 ok; 1 failed requests with --fail-on-errors (run), missing orders or fewer than
--min-orders acknowledged (verify); 2 bad input (refused target, bad option, preflight failure,
unreadable file, database unreachable).
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import math
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn, Union
from urllib.parse import quote, urlsplit

PROG = "loadgen"
KINDS = ("browse", "profile", "checkout")
DEFAULT_MIX = "browse=60,profile=25,checkout=15"
DEFAULT_URL = "http://127.0.0.1:8080"
FLEET_NETWORKS = (ipaddress.ip_network("10.90.0.0/16"),)
PRIVATE_RANGES = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
DEFAULT_RECORD_HEADERS = ("X-Release", "X-Backend", "X-Served-By")
GEN_DATA_MIN_CUSTOMERS = 20  # scripts/gen_data.py: customers = max(20, ...), ids from 1
GEN_DATA_MIN_PAGES = 10  # scripts/gen_data.py: pages = max(10, ...), ids from 1
MAX_RATE = 200.0
MAX_DURATION = 6 * 3600.0
MAX_WORKERS = 64
MAX_BODY = 1024 * 1024
STOP_POLL = 0.1
MORE = "The record and summary formats, the defaults and the exit codes: loadgen.py --help"
SLUG_RE = re.compile(r"[-a-zA-Z0-9_]+")
IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class InputError(Exception):
    """Bad input: one line on stderr, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: {message} (see --help)\n")


# --- input ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    prefix: str  # the base URL's path, without a trailing slash

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"


def parse_allow_net(text: str) -> Network:
    """A --allow-net CIDR: must lie inside a private range."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a network: {exc}") from None
    if not any(net.version == r.version and net.subnet_of(r) for r in PRIVATE_RANGES):  # type: ignore[arg-type]
        raise argparse.ArgumentTypeError(f"{text} is not private: it must lie inside " + ", ".join(map(str, PRIVATE_RANGES)))
    return net


def check_target(url: str, allow: Sequence[Network] = ()) -> Target:
    """The target if its host is loopback or inside the fleet network or an --allow-net range; InputError otherwise."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise InputError(f"refusing {url!r}: only http:// and https:// URLs")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise InputError(f"refusing {url!r}: a base URL has no user, password, query or fragment")
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InputError(f"refusing {url!r}: bad port") from None
    if not host:
        raise InputError(f"refusing {url!r}: no host")
    if host != "localhost":
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise InputError(
                f"refusing {url!r}: {host!r} is a host name; give an address (127.0.0.1, ::1, a 10.90.0.x fleet host)"
            ) from None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        nets = (*FLEET_NETWORKS, *allow)
        if not (addr.is_loopback or any(addr in net for net in nets)):
            raise InputError(
                f"refusing {url!r}: {addr} is neither loopback nor in "
                + ", ".join(map(str, nets))
                + " (--allow-net adds a range)"
            )
    return Target(parts.scheme, host, port, parts.path.rstrip("/"))


def parse_mix(text: str) -> dict[str, float]:
    """'browse=60,profile=25,checkout=15' -> {kind: weight}; kinds left out weigh 0."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        name = name.strip()
        if not sep:
            raise argparse.ArgumentTypeError(f"item {item.strip()!r} is not KIND=WEIGHT")
        if name not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {name!r} (kinds: {', '.join(KINDS)})")
        if name in weights:
            raise argparse.ArgumentTypeError(f"{name} given twice")
        try:
            weight = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise argparse.ArgumentTypeError(f"weight of {name} must be >= 0, not {value!r}")
        weights[name] = weight
    if sum(weights.values()) <= 0:
        raise argparse.ArgumentTypeError("the weights add up to 0")
    return {kind: weights.get(kind, 0.0) for kind in KINDS}


def parse_ids(text: str) -> Sequence[int]:
    """'1-20' or '3,5,8' (or a mix: '1-5,9') -> the customer ids."""
    ids: list[int] = []
    for item in text.split(","):
        low, sep, high = item.strip().partition("-")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not N or N-M") from None
        if first < 1 or last < first or last - first >= 1_000_000:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not a range of positive ids")
        if not sep:
            ids.append(first)
        elif len(text.split(",")) == 1:
            return range(first, last + 1)
        else:
            ids.extend(range(first, last + 1))
    return ids


def parse_slugs(text: str) -> list[str]:
    slugs = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in slugs if not SLUG_RE.fullmatch(s)]
    if not slugs or bad:
        raise argparse.ArgumentTypeError(f"give comma-separated slugs (letters, digits, - and _), not {text!r}")
    return slugs


def bounded(kind: type, low: float, high: float, name: str) -> Any:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, not {text!r}") from None
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"{name} must be > {low:g} and <= {high:g}, not {text}")
        return value

    return convert


def gen_data_page_slugs(seed: int) -> list[str]:
    """Published CMS pages among ids 1..10 as scripts/gen_data.py generates them for `seed`.

    gen_data always makes at least 10 pages, and the rows of a chunk depend only on the seed.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import gen_data
    except (ImportError, SystemExit):
        raise InputError("cannot import scripts/gen_data.py to derive the page slugs: pass --page-slugs") from None
    plan = gen_data.Plan.for_size(gen_data.parse_size("1MB"), seed)
    columns = [c.strip() for c in gen_data.COLUMNS["cms_pages"].split(",")]
    slug_at, published_at = columns.index("slug"), columns.index("published")
    rows = [line.split("\t") for line in gen_data.build_pages(plan, 0, 1, GEN_DATA_MIN_PAGES + 1)["cms_pages"].splitlines()]
    return [row[slug_at] for row in rows if row[published_at] == "t"]


def path_template(text: str, name: str, **sample: object) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"{name} must start with /")
    try:
        text.format(**sample)
    except (KeyError, IndexError, ValueError) as exc:
        fields = ", ".join("{" + k + "}" for k in sample) or "none"
        raise argparse.ArgumentTypeError(f"{name} {text!r}: bad placeholder {exc} (allowed: {fields})") from None
    return text


# --- requests ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    target: Target
    rate: float
    duration: float
    timeout: float
    workers: int
    mix: dict[str, float]
    customer_ids: Sequence[int]
    page_slugs: Sequence[str]
    browse_path: str
    profile_path: str
    checkout_path: str
    order_id_field: str
    record_headers: Sequence[str]
    seed: int
    stop_file: Path | None


@dataclass(frozen=True)
class Request:
    seq: int
    kind: str
    method: str
    path: str
    body: bytes | None
    due: float  # time.monotonic() at which it is due
    due_epoch: float


@dataclass
class Response:
    status: int = 0
    error: str | None = None
    body: bytes = b""
    headers: dict[str, str] | None = None


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (type(exc).__name__ + (": " + text if text else ""))[:200]


def http_call(target: Target, req: Request, timeout: float, record_headers: Sequence[str]) -> Response:
    """One request on a new connection; never raises for network trouble (status 0 + error instead)."""
    cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    conn = cls(target.host, target.port, timeout=timeout)
    deadline = time.monotonic() + timeout
    headers = {"User-Agent": "djm-loadgen", "Accept": "application/json, text/html;q=0.9", "Connection": "close"}
    if req.body is not None:
        headers["Content-Type"] = "application/json"
    result = Response()
    try:
        conn.request(req.method, req.path, body=req.body, headers=headers)
        resp = conn.getresponse()
        result.status = resp.status
        result.headers = {name: value[:100] for name in record_headers if (value := resp.getheader(name))}
        chunks: list[bytes] = []
        size = 0
        while size < MAX_BODY:  # each read is bounded by the socket timeout; the whole body by the deadline
            chunk = resp.read(64 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"body not read within {timeout:g} s")
        result.body = b"".join(chunks)
    except (OSError, http.client.HTTPException) as exc:
        result.error = short(exc)
    finally:
        conn.close()
    return result


def order_id_of(body: bytes, field: str) -> int | None:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    value = data.get(field) if isinstance(data, dict) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def error_detail(body: bytes) -> str:
    """The app's own error text ({"error": ...}), if its body says one."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return ""
    return str(data.get("error", ""))[:100] if isinstance(data, dict) else ""


def perform(cfg: Config, req: Request) -> dict[str, Any]:
    """Send `req` (unless it waited too long for a worker) and return its record."""
    waited = time.monotonic() - req.due
    if waited > cfg.timeout:
        resp = Response(error=f"not sent: all {cfg.workers} workers busy for {waited:.1f} s")
    else:
        resp = http_call(cfg.target, req, cfg.timeout, cfg.record_headers)
    ended = time.monotonic()
    order_id = None
    if resp.error is None and not 200 <= resp.status < 400:
        detail = error_detail(resp.body)
        resp.error = f"HTTP {resp.status}" + (f": {detail}" if detail else "")
    if req.kind == "checkout" and resp.error is None:
        order_id = order_id_of(resp.body, cfg.order_id_field) if 200 <= resp.status < 300 else None
        if order_id is None:
            resp.error = f"HTTP {resp.status} without an integer {cfg.order_id_field!r} in a JSON body"
    return {
        "seq": req.seq,
        "t_start": round(req.due_epoch, 6),
        "duration_ms": round((ended - req.due) * 1000, 3),
        "wait_ms": round(max(0.0, waited) * 1000, 3),
        "kind": req.kind,
        "method": req.method,
        "path": req.path,
        "status": resp.status,
        "ok": resp.error is None,
        "error": resp.error,
        "order_id": order_id,
        "headers": resp.headers or {},
    }


class Requests:
    """The deterministic request sequence of a run (kind, customer, page drawn from --seed)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)  # noqa: S311 - a traffic mix, not a secret
        self.kinds = [k for k in KINDS if cfg.mix[k] > 0]
        self.weights = [cfg.mix[k] for k in self.kinds]

    def make(self, seq: int, due: float, due_epoch: float) -> Request:
        cfg, rng = self.cfg, self.rng
        kind = rng.choices(self.kinds, weights=self.weights)[0]
        customer = rng.choice(cfg.customer_ids)
        if kind == "browse":
            path, method, body = cfg.browse_path.format(slug=quote(rng.choice(cfg.page_slugs), safe="")), "GET", None
        elif kind == "profile":
            path, method, body = cfg.profile_path.format(customer_id=customer), "GET", None
        else:
            body = json.dumps({"customer_id": customer, "provider": "loadgen"}).encode()
            path, method = cfg.checkout_path.format(customer_id=customer), "POST"
        return Request(seq, kind, method, cfg.target.prefix + path, body, due, due_epoch)


def preflight(cfg: Config) -> None:
    """GET every page slug and the first and last customer id once; InputError if one fails."""
    checks = []
    if cfg.mix["browse"] > 0:
        checks += [("browse", cfg.browse_path.format(slug=quote(s, safe=""))) for s in cfg.page_slugs]
    if cfg.mix["profile"] > 0:
        checks += [
            ("profile", cfg.profile_path.format(customer_id=c)) for c in sorted({cfg.customer_ids[0], cfg.customer_ids[-1]})
        ]
    for kind, path in checks:
        req = Request(-1, kind, "GET", cfg.target.prefix + path, None, time.monotonic(), time.time())
        resp = http_call(cfg.target, req, cfg.timeout, ())
        if resp.error or not 200 <= resp.status < 400:
            raise InputError(
                f"preflight: GET {req.path} -> {resp.error or resp.status}: the data does not match"
                " (--page-slugs/--data-seed, --customer-ids, the path options) or the app is not up; --no-preflight skips this"
            )


class Recorder:
    """Appends records to the JSONL file, one line each, flushed: a crash keeps what was recorded."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.internal_errors: list[str] = []

    def run(self, cfg: Config, req: Request) -> None:
        try:
            line = json.dumps(perform(cfg, req)) + "\n"
            with self.lock:
                self.out.write(line)
                self.out.flush()
        except Exception as exc:  # recorded, reported at the end (exit 2): a worker must not die silently
            with self.lock:
                self.internal_errors.append(f"request {req.seq}: {short(exc)}")


def wait_until(due: float, deadline: float, stop: threading.Event, stop_file: Path | None) -> str | None:
    """Sleep until `due`; the reason to stop instead (stop-file, signal, duration), if any."""
    while True:
        if stop.is_set():
            return "signal"
        if stop_file is not None and stop_file.exists():
            return "stop-file"
        now = time.monotonic()
        if now >= deadline:
            return "duration"
        if now >= due:
            return None
        stop.wait(min(due - now, STOP_POLL))


def run_load(cfg: Config, out: IO[str], stop: threading.Event) -> tuple[str, list[str]]:
    """Schedule the requests open-loop; returns (why it stopped, internal errors)."""
    requests = Requests(cfg)
    recorder = Recorder(out)
    limit = math.ceil(cfg.rate * cfg.duration)
    start, start_epoch = time.monotonic(), time.time()
    deadline = start + cfg.duration
    stopped_by = "duration"
    with ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="loadgen") as pool:
        for seq in range(limit):
            due = start + seq / cfg.rate
            reason = wait_until(due, deadline, stop, cfg.stop_file)
            if reason is not None:
                stopped_by = reason
                break
            pool.submit(recorder.run, cfg, requests.make(seq, due, start_epoch + (due - start)))
    return stopped_by, recorder.internal_errors


# --- summary ----------------------------------------------------------------------------------------------


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    try:
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise InputError(f"{path}:{number}: not a JSON line") from None
                if not isinstance(record, dict) or not {"t_start", "kind", "status", "ok"} <= record.keys():
                    raise InputError(f"{path}:{number}: not a loadgen record")
                yield record
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(pct / 100 * len(sorted_values)) - 1)]


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total = failed = acknowledged = 0
    latencies: dict[str, list[float]] = defaultdict(list)
    kind_total: Counter[str] = Counter()
    kind_failed: Counter[str] = Counter()
    by_kind_status: dict[str, Counter[str]] = defaultdict(Counter)
    by_status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    per_second: Counter[int] = Counter()
    failed_per_second: Counter[int] = Counter()
    headers_seen: dict[str, Counter[str]] = defaultdict(Counter)
    starts: list[float] = []
    first_failure = last_failure = None
    end = None
    for rec in records:
        total += 1
        t, kind = float(rec["t_start"]), str(rec["kind"])
        starts.append(t)
        finish = t + float(rec.get("duration_ms") or 0) / 1000
        end = finish if end is None else max(end, finish)
        kind_total[kind] += 1
        latencies[kind].append(float(rec.get("duration_ms") or 0))
        per_second[int(t)] += 1
        for name, value in (rec.get("headers") or {}).items():
            headers_seen[name][value] += 1
        if rec.get("order_id") is not None:
            acknowledged += 1
        if not rec["ok"]:
            failed += 1
            kind_failed[kind] += 1
            by_kind_status[kind][str(rec["status"])] += 1
            by_status[str(rec["status"])] += 1
            errors[str(rec.get("error"))] += 1
            failed_per_second[int(t)] += 1
            first_failure = t if first_failure is None else min(first_failure, t)
            last_failure = t if last_failure is None else max(last_failure, t)
    start = min(starts) if starts else None
    seconds = range(int(start), int(max(starts)) + 1) if starts and start is not None else range(0)
    by_kind = {}
    for kind in KINDS:
        values = sorted(latencies.get(kind, []))
        by_kind[kind] = {
            "total": kind_total[kind],
            "failed": kind_failed[kind],
            "latency_ms": {
                "p50": percentile(values, 50),
                "p95": percentile(values, 95),
                "p99": percentile(values, 99),
                "max": values[-1] if values else None,
            },
        }
    span = max(starts) - min(starts) if starts else 0.0
    return {
        "total": total,
        "ok": total - failed,
        "failed": failed,
        "orders_acknowledged": acknowledged,
        "window": {
            "start": start,
            "end": round(end, 6) if end is not None else None,
            "seconds": round(end - start, 3) if end is not None and start is not None else 0.0,
        },
        "requests_per_s": round((total - 1) / span, 3) if total > 1 and span > 0 else None,
        "by_kind": by_kind,
        "failures_by_kind": {k: dict(v) for k, v in sorted(by_kind_status.items())},
        "failures_by_status": dict(sorted(by_status.items())),
        "errors": dict(errors.most_common(10)),
        "first_failure": first_failure,
        "last_failure": last_failure,
        "failure_timeline": [
            {"second": s, "total": per_second[s], "failed": failed_per_second[s]} for s in seconds if failed_per_second[s]
        ],
        "timeline": [{"second": s, "total": per_second[s], "failed": failed_per_second[s]} for s in seconds],
        "headers_seen": {name: dict(values) for name, values in sorted(headers_seen.items())},
    }


def iso(epoch: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch)) + f".{int((epoch % 1) * 10)}" if epoch is not None else "-"


def print_summary(summary: dict[str, Any], file: IO[str]) -> None:
    window = summary["window"]
    rate = summary["requests_per_s"]
    print(
        f"{PROG}: {summary['total']} requests in {window['seconds']:.1f} s ({rate if rate is not None else '-'}/s),"
        f" {summary['failed']} failed, {summary['orders_acknowledged']} orders acknowledged",
        file=file,
    )
    for kind, info in summary["by_kind"].items():
        lat = info["latency_ms"]
        if info["total"]:
            print(
                f"  {kind:<9} {info['total']:>7} requests {info['failed']:>6} failed"
                f"   latency ms p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}  max {lat['max']:.1f}",
                file=file,
            )
    if summary["failed"]:
        statuses = ", ".join(
            f"{kind} {status}: {n}" for kind, counts in summary["failures_by_kind"].items() for status, n in counts.items()
        )
        print(
            f"  failures from {iso(summary['first_failure'])} to {iso(summary['last_failure'])}"
            f" in {len(summary['failure_timeline'])} s: {statuses}",
            file=file,
        )
        for error, n in list(summary["errors"].items())[:3]:
            print(f"  {n} x {error}", file=file)
    for name, values in summary["headers_seen"].items():
        print(f"  {name}: " + ", ".join(f"{v} x{n}" for v, n in values.items()), file=file)


# --- verify -----------------------------------------------------------------------------------------------


def acknowledged_ids(path: Path) -> list[int]:
    ids = {int(r["order_id"]) for r in read_records(path) if r["ok"] and r.get("order_id") is not None}
    return sorted(ids)


def split_identifier(text: str, option: str) -> list[str]:
    parts = text.split(".")
    if not 1 <= len(parts) <= 2 or not all(IDENT_RE.fullmatch(p) for p in parts):
        raise InputError(f"{option} {text!r}: give a plain SQL name (optionally schema.name)")
    return parts


def redact(text: str, secret: str | None) -> str:
    text = re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", text, flags=re.IGNORECASE)
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return text.replace(secret, "***") if secret else text


def dsn_password(dsn: str) -> str | None:
    try:
        from psycopg.conninfo import conninfo_to_dict

        return str(conninfo_to_dict(dsn).get("password") or "") or None
    except Exception:  # an unparsable DSN: the connection attempt reports it
        return None


def found_by_dsn(dsn: str, table: list[str], column: str, ids: list[int]) -> set[int]:
    try:
        import psycopg
        from psycopg import sql
    except ImportError:
        raise InputError("--dsn needs psycopg 3 (in the project's .venv); or use --psql-cmd") from None
    query = sql.SQL("SELECT {col} FROM {table} WHERE {col} = ANY(%s::bigint[])").format(
        col=sql.Identifier(column), table=sql.Identifier(*table)
    )
    try:
        with psycopg.connect(dsn, connect_timeout=10, application_name="loadgen-verify") as conn:
            return {int(row[0]) for row in conn.execute(query, [ids]).fetchall()}
    except psycopg.Error as exc:
        raise InputError("database: " + redact(" ".join(str(exc).split())[:300], dsn_password(dsn))) from None


def found_by_psql(command: str, table: list[str], column: str, ids: list[int]) -> set[int]:
    def quote_ident(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    col = quote_ident(column)
    query = (
        f"SELECT {col} FROM {'.'.join(map(quote_ident, table))} WHERE {col} = ANY('{{{','.join(map(str, ids))}}}'::bigint[]);\n"
    )
    argv = [*shlex.split(command), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
    try:
        result = subprocess.run(argv, input=query, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InputError(f"--psql-cmd: {short(exc)}") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise InputError(f"--psql-cmd exited {result.returncode}: " + redact(lines[-1] if lines else "", None))
    try:
        return {int(line) for line in result.stdout.split() if line.strip()}
    except ValueError:
        raise InputError("--psql-cmd: unexpected output (is it a psql command?)") from None


def verify(args: argparse.Namespace) -> int:
    table = split_identifier(args.table, "--table")
    column = split_identifier(args.id_column, "--id-column")
    if len(column) != 1:
        raise InputError("--id-column: a column name, not schema.name")
    ids = acknowledged_ids(Path(args.jsonl))
    found: set[int] = set()
    if ids:
        if args.psql_cmd is not None:
            found = found_by_psql(args.psql_cmd, table, column[0], ids)
        else:
            found = found_by_dsn(args.dsn, table, column[0], ids)
    missing = [i for i in ids if i not in found]
    where = f"{args.table}.{args.id_column}"
    if args.json:
        print(json.dumps({"acknowledged": len(ids), "found": len(ids) - len(missing), "missing": missing, "table": where}))
    else:
        print(
            f"{PROG} verify: {len(ids)} acknowledged orders, {len(ids) - len(missing)} found, {len(missing)} missing in {where}"
        )
        if missing:
            print("missing: " + ", ".join(map(str, missing)))
    if len(ids) < args.min_orders:
        print(f"{PROG} verify: fewer acknowledged orders than --min-orders {args.min_orders}: nothing proven", file=sys.stderr)
        return 1
    return 1 if missing else 0


# --- command line -----------------------------------------------------------------------------------------


def build_parser() -> Parser:
    parser = Parser(prog="loadgen.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,summary,verify}")

    run = sub.add_parser("run", help="send the load, record it, print the summary", description=MORE)
    run.add_argument("--url", default=DEFAULT_URL, help=f"base URL: loopback or fleet address only (default {DEFAULT_URL})")
    run.add_argument("--out", required=True, type=Path, help="JSONL file: one record per request (overwritten)")
    run.add_argument("--summary", type=Path, help="also write the summary there as JSON")
    run.add_argument(
        "--rate", type=bounded(float, 0, MAX_RATE, "--rate"), default=20.0, help="requests/s, all kinds (default 20)"
    )
    run.add_argument(
        "--duration", type=bounded(float, 0, MAX_DURATION, "--duration"), default=60.0, help="hard bound, seconds (default 60)"
    )
    run.add_argument("--stop-file", type=Path, help="stop early when this file appears (must not exist at start)")
    run.add_argument("--timeout", type=bounded(float, 0, 60, "--timeout"), default=5.0, help="per request, seconds (default 5)")
    run.add_argument(
        "--workers", type=bounded(int, 0, MAX_WORKERS, "--workers"), default=16, help="concurrent requests at most (default 16)"
    )
    run.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX), help=f"kind weights (default {DEFAULT_MIX})")
    run.add_argument(
        "--customer-ids",
        type=parse_ids,
        default=range(1, GEN_DATA_MIN_CUSTOMERS + 1),
        help=f"ids for profile and checkout: N-M or N,M,... (default 1-{GEN_DATA_MIN_CUSTOMERS}: gen_data makes them all)",
    )
    run.add_argument("--page-slugs", type=parse_slugs, help="CMS page slugs to browse (default: derived from --data-seed)")
    run.add_argument("--data-seed", type=int, default=1, help="gen_data --seed of the data, for the page slugs (default 1)")
    run.add_argument("--browse-path", default="/pages/{slug}", help="default /pages/{slug} (the fixture's)")
    run.add_argument("--profile-path", default="/smoke/profile/{customer_id}", help="default /smoke/profile/{customer_id}")
    run.add_argument("--checkout-path", default="/smoke/checkout", help="POSTed JSON; default /smoke/checkout")
    run.add_argument("--order-id-field", default="order_id", help="checkout response's order id key (default order_id)")
    run.add_argument(
        "--record-header",
        action="append",
        help="response header to record when present (repeatable; default " + ", ".join(DEFAULT_RECORD_HEADERS) + ")",
    )
    run.add_argument(
        "--allow-net", action="append", type=parse_allow_net, default=[], help="extra private CIDR allowed as target (repeatable)"
    )
    run.add_argument("--seed", type=int, default=1, help="seed of the request sequence (default 1)")
    run.add_argument("--no-preflight", dest="preflight", action="store_false", help="skip the GETs that check the data first")
    run.add_argument("--fail-on-errors", action="store_true", help="exit 1 when any request failed")

    summary = sub.add_parser("summary", help="print the summary of a JSONL file", description=MORE)
    summary.add_argument("jsonl", type=Path)
    summary.add_argument("--json", action="store_true", help="print JSON")

    check = sub.add_parser("verify", help="check that every acknowledged order is in the database", description=MORE)
    check.add_argument("jsonl", type=Path)
    source = check.add_mutually_exclusive_group(required=True)
    source.add_argument("--dsn", help="libpq DSN or URI ('' = PG* environment variables); never printed")
    source.add_argument("--psql-cmd", help="psql command line reading SQL on stdin, e.g. 'podman exec -i db1 psql -U app acme'")
    check.add_argument("--table", default="orders", help="orders table, optionally schema.table (default orders)")
    check.add_argument("--id-column", default="id", help="its id column (default id)")
    check.add_argument("--min-orders", type=int, default=1, help="fewer acknowledged orders than this is a failure (default 1)")
    check.add_argument("--json", action="store_true", help="print JSON")
    return parser


def make_config(args: argparse.Namespace) -> Config:
    target = check_target(args.url, args.allow_net)
    if args.stop_file is not None and args.stop_file.exists():
        raise InputError(f"--stop-file {args.stop_file} exists already: remove it first")
    try:
        browse = path_template(args.browse_path, "--browse-path", slug="s")
        profile = path_template(args.profile_path, "--profile-path", customer_id=1)
        checkout = path_template(args.checkout_path, "--checkout-path", customer_id=1)
    except argparse.ArgumentTypeError as exc:
        raise InputError(str(exc)) from None
    slugs = args.page_slugs
    if slugs is None:
        slugs = gen_data_page_slugs(args.data_seed) if args.mix["browse"] > 0 else ["-"]
    return Config(
        target=target,
        rate=args.rate,
        duration=args.duration,
        timeout=args.timeout,
        workers=args.workers,
        mix=args.mix,
        customer_ids=args.customer_ids,
        page_slugs=slugs,
        browse_path=browse,
        profile_path=profile,
        checkout_path=checkout,
        order_id_field=args.order_id_field,
        record_headers=tuple(args.record_header or DEFAULT_RECORD_HEADERS),
        seed=args.seed,
        stop_file=args.stop_file,
    )


def run(args: argparse.Namespace) -> int:
    cfg = make_config(args)
    if args.preflight:
        preflight(cfg)
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        with args.out.open("w", encoding="utf-8") as out:
            stopped_by, internal = run_load(cfg, out, stop)
    except OSError as exc:
        raise InputError(f"cannot write {args.out}: {exc.strerror}") from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    summary = {
        "url": cfg.target.url(),
        "rate": cfg.rate,
        "duration": cfg.duration,
        "mix": cfg.mix,
        "stopped_by": stopped_by,
        "file": str(args.out),
        **summarize(read_records(args.out)),
    }
    print_summary(summary, sys.stdout)
    if args.summary is not None:
        try:
            args.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write {args.summary}: {exc.strerror}") from None
    if internal:
        raise InputError(f"{len(internal)} requests not recorded (loadgen bug): {internal[0]}")
    return 1 if args.fail_on_errors and summary["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return run(args)
        if args.command == "summary":
            summary = {"file": str(args.jsonl), **summarize(read_records(args.jsonl))}
            if args.json:
                print(json.dumps(summary, indent=2))
            else:
                print_summary(summary, sys.stdout)
            return 0
        return verify(args)
    except InputError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
