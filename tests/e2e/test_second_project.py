"""A project the tool was not written for, on the same fleet: examples/library.

Its settings package reads its own environment names, manage.py lives in src/, it has no health view
and serves no static file itself (hashed names), and a third-party app brings a migration of its
own. Only its inventory (examples/library/inventory, beside a copy of the fleet's hosts file) tells
the tool about it: deploy, migrate to v2 and roll back, with the health gate on and its pages and
their static files fetched through the load balancer all along.

It replaces the load balancer's configuration with the library's, and puts acme's back at its end
(pass or fail), so that any test may follow it on its fleet.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import APP_HOSTS, E2E, INVENTORY, LOGS, REPO

LIBRARY = REPO / "examples" / "library"
BOOKS = 24


def build_release(inventory: Path, release: str) -> None:
    """releases/library-<id>.tar.gz beside the inventory: v1's tree, then v2's files over it."""
    tree = LOGS / "library-trees" / release
    shutil.rmtree(tree, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.sqlite3")
    for layer in ("v1", "v2")[: int(release[1:])]:
        shutil.copytree(LIBRARY / layer, tree, ignore=ignore, dirs_exist_ok=True)
    (inventory / "releases").mkdir(parents=True, exist_ok=True)
    with tarfile.open(inventory / "releases" / f"library-{release}.tar.gz", "w:gz") as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)


class Browser(threading.Thread):
    """A reader through the load balancer, until stopped: the book list, then the stylesheet it links."""

    def __init__(self, e2e: E2E) -> None:
        super().__init__(daemon=True)
        self.e2e = e2e
        self.results: Counter[str] = Counter()
        self.stylesheets: set[str] = set()
        self.stopped = threading.Event()

    def get(self, path: str) -> tuple[int, str]:
        """E2E.get, with a refused or cut connection counted as status 0 instead of ending the thread."""
        try:
            return self.e2e.get(path)
        except OSError as error:
            return 0, str(error)

    def run(self) -> None:
        while not self.stopped.is_set():
            status, page = self.get("/")
            self.results[f"page {status}"] += 1
            link = re.search(r'href="(/static/shelf/site\.[0-9a-f]{12}\.css)"', page)
            if status == 200:
                if link is None:
                    self.results["page without its hashed stylesheet"] += 1
                else:
                    self.stylesheets.add(link[1])
                    self.results[f"stylesheet {self.get(link[1])[0]}"] += 1
            time.sleep(0.1)

    def stop(self) -> Counter[str]:
        self.stopped.set()
        self.join(timeout=30)
        return self.results


def browsing(e2e: E2E, run: Callable[[], Any]) -> tuple[Any, Counter[str], set[str]]:
    browser = Browser(e2e)
    browser.start()
    try:
        result = run()
    finally:
        seen = browser.stop()
    return result, seen, browser.stylesheets


def test_a_project_not_written_for_the_tool_deploys_migrates_and_rolls_back_from_its_inventory_alone(e2e: E2E) -> None:
    try:
        library_deploy_migrate_rollback(e2e)
    finally:
        # Hand lb1 back to acme (its inventory's HAProxy configuration; acme's services ran on all along):
        # the next test on this fleet expects the site it left, whatever happened here.
        # acme's servers UP again (HAProxy's health checks).
        e2e.redeploy_loadbalancer(log="acme-loadbalancer-back")
    assert e2e.checkout_works() and set(e2e.haproxy_states().values()) == {"UP"}, e2e.haproxy_states()


def library_deploy_migrate_rollback(e2e: E2E) -> None:
    inventory = LOGS / "library-inventory"
    shutil.rmtree(inventory, ignore_errors=True)
    shutil.copytree(LIBRARY / "inventory", inventory)
    shutil.copy(INVENTORY, inventory / "hosts.yml")
    for release in ("v1", "v2"):
        build_release(inventory, release)

    def play(name: str, *args: str, log: str) -> Any:
        return e2e.playbook(name, *args, check=True, log=log, inventory=inventory / "hosts.yml")

    def sql(query: str) -> str:
        return e2e.ssh("db1", f'sudo -u postgres psql -X -At -d library -c "{query}"')

    def record() -> dict[str, Any]:
        last = e2e.ssh("db1", "sudo cat /var/lib/djm/library/last-run")
        return dict(json.loads(e2e.ssh("db1", f"sudo cat /var/lib/djm/library/runs/{last}.json")))

    def serving() -> set[str]:
        return {e2e.ssh(host, "basename $(readlink /srv/library/current)") for host in APP_HOSTS}

    deploy = play("playbooks/deploy.yml", log="library-deploy-v1")
    print(f"\nlibrary deploy v1: {deploy.seconds:.0f}s")
    assert serving() == {"v1"}
    # The gate was on, with the role's defaults: a status on `/`, and the process checked on the host.
    assert re.search(r"TASK \[django_service : Wait until the service answers /\]", deploy.output), "the gate did not run"
    sql("INSERT INTO shelf_author (name) VALUES ('Ursula K. Le Guin'), ('Italo Calvino'), ('Jorge Luis Borges')")
    sql(
        f"INSERT INTO shelf_book (title, author_id) SELECT 'Book ' || lpad(n::text, 3, '0'), 1 + n % 3"
        f" FROM generate_series(1, {BOOKS}) AS n"
    )
    books = "SELECT md5(string_agg(id || ':' || title || ':' || author_id, ',' ORDER BY id)) FROM shelf_book"
    before = sql(books)

    migrate, seen, stylesheets = browsing(
        e2e, lambda: play("migrate.yml", "-e", "project_release_id=v2", log="library-migrate-v2")
    )
    print(f"library migrate v1->v2: {migrate.seconds:.0f}s, through lb1 {dict(seen)}, stylesheets {sorted(stylesheets)}")
    run = record()
    print(f"library migrate: strategy {run.get('strategy')} ({run.get('strategy_reason')}), applied {run.get('applied')}")
    assert run["result"] == "succeeded" and serving() == {"v2"}
    assert sql("SELECT count(*) FROM shelf_book WHERE isbn LIKE 'LIB-%'") == str(BOOKS)  # its RunPython ran
    assert sql("SELECT count(*) FROM django_migrations WHERE app = 'taggit' AND name LIKE '0006%'") == "1"
    # Every page and its stylesheet answered; a 503 only if the plan chose the maintenance window.
    assert set(seen) - ({"page 503"} if run["strategy"] == "maintenance" else set()) == {"page 200", "stylesheet 200"}, seen
    assert len(stylesheets) == 2, stylesheets  # v1's and v2's hashed names, both served during the roll
    status, page = e2e.get("/")
    assert status == 200 and "LIB-000001" in page, page[:500]

    rollback, seen, stylesheets = browsing(e2e, lambda: play("rollback.yml", log="library-rollback"))
    run = record()
    mode = run.get("converge", {}).get("mode")
    print(f"library rollback: {rollback.seconds:.0f}s, mode {mode}, through lb1 {dict(seen)}")
    assert run["result"] == "rolled_back" and serving() == {"v1"}
    assert sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'shelf_book' AND column_name = 'isbn'") == "0"
    assert sql("SELECT count(*) FROM django_migrations WHERE app = 'taggit' AND name LIKE '0006%'") == "0"
    assert sql(books) == before
    # taggit's 0006 (RenameIndex(old_fields=...)) reverses to nothing: its index keeps the new name,
    # which the validation against the backup reports rather than calls a difference.
    assert run["validation"]["schema_equal"] and run["validation"]["migrations_equal"], run["validation"]
    assert [(i["table"], i["live"]) for i in run["validation"]["renamed_indexes"]] == [
        ("public.taggit_taggeditem", "taggit_tagg_content_8fc721_idx")
    ], run["validation"]
    # Reversing migrations holds the site in the maintenance window (503) while they run, its home
    # page too (the health path, `/` here, is let through only when it is not a page users read):
    # nothing else.
    assert set(seen) - {"page 503", "stylesheet 503"} == {"page 200", "stylesheet 200"}, seen
