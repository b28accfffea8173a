#!/usr/bin/env python3
"""Fill the ACME v1 schema with realistic, deterministic data, fast (COPY only).

Run it after ``manage.py migrate`` of release v1, on an empty database:

    scripts/gen_data.py --dsn "host=... dbname=acme" --size 50MB [--seed 1] [--jobs 2]

* Deterministic: the same ``--seed`` and ``--size`` give the same rows (ids included), whatever
  ``--jobs`` is: every chunk of rows draws from its own RNG seeded by (seed, table, chunk).
* Realistic and not trivially compressible: names, e-mail addresses, postal addresses, free text
  from a large generated vocabulary, JSON payment details and preferences, legacy password hashes.
* Shape: orders are about 30 % of the bytes (``pg_total_relation_size``), then payments,
  order_items, profiles, customers, products, CMS pages. Product categories are free text with the
  case/whitespace messiness v2's normalization has to fold ("Home & Garden", "home & garden",
  "HOME & GARDEN ", "Home  &  Garden", NBSP...).
* Bulk only: ``COPY ... FROM STDIN`` per chunk, never row-by-row INSERT. As a superuser the loading
  sessions set ``session_replication_role = replica`` (no per-row FK trigger; the rows are
  consistent by construction); otherwise FK checks run and parents are loaded first.
* Afterwards: sequences set past the highest id, VACUUM (ANALYZE), and a report of rows, bytes, shares
  and MB/s.

Generated customers log in with the legacy password ``acme-<customer id>`` (e.g. ``acme-1``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import multiprocessing
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

try:
    import psycopg
    from psycopg import sql
except ImportError:  # pragma: no cover - only on hosts without psycopg
    sys.stderr.write("gen_data: psycopg 3 is required (pip install 'psycopg[binary]')\n")
    raise SystemExit(2) from None

TABLES = ("customers", "profiles", "products", "cms_pages", "orders", "order_items", "payments")
CHUNK = 5000  # parent rows per COPY chunk (orders chunks also carry their items and payments)

# Calibrated with this generator on PostgreSQL 15 (see docs/fixture-app.md): measured
# pg_total_relation_size of all seven tables divided by the number of orders.
BYTES_PER_ORDER = 1750
ORDERS_PER_CUSTOMER = 3
ORDERS_PER_PRODUCT = 40
ORDERS_PER_PAGE = 400
EPOCH_START = int(dt.datetime(2017, 1, 1, tzinfo=dt.timezone.utc).timestamp())
EPOCH_END = int(dt.datetime(2024, 12, 31, tzinfo=dt.timezone.utc).timestamp())

_FIRST_NAMES = (
    "Olivia Amelia Isla Ava Mia Ivy Lily Isabella Rosie Sophia Grace Willow Freya Florence Emily Ella Poppy Evie Elsie "
    "Charlotte Evelyn Sienna Sofia Daisy Alice Harper Hannah Matilda Ruby Emilia Maeve Jessica Phoebe Chloe Lucy Millie "
    "Noah Oliver George Arthur Muhammad Leo Harry Oscar Archie Henry Theodore Freddie Jack Charlie Theo Alfie Jacob "
    "Thomas Finley Arlo William Lucas Roman Tommy Isaac Teddy Luca Edward Adam Joshua Ezra Max Louis Albert Hugo "
    "Maximilian Jonas Lukas Felix Paul Elias Mathis Lena Emma Hanna Marie Lea Clara Anna Léa Chloé Inès Manon Camille "
    "Zoé Gabriel Raphaël Jules Arthur Maël Sofía Lucía Martina Hugo Mateo Martín Giulia Aurora Francesco Alessandro "
    "Zuzanna Julia Jan Antoni Jakub Sanne Daan Sem Liam Fenna Saoirse Aoife Conor Oisín Seán Niamh Ciarán"
)
FIRST_NAMES = _FIRST_NAMES.split()
_LAST_NAMES = (
    "Smith Jones Taylor Brown Williams Wilson Johnson Davies Patel Robinson Wright Thompson Evans Walker White Roberts "
    "Green Hall Thomas Clarke Jackson Wood Harris Edwards Turner Martin Cooper Hill Ward Hughes Moore Clark King Harrison "
    "Lewis Baker Lee Allen Morris Khan Scott Watson Davis Parker James Bennett Young Phillips Richardson Mitchell Bailey "
    "Carter Cook Singh Shaw Bell Collins Morgan Kelly Begum Miller Cox Hussain Marshall Simpson Price Anderson Adams "
    "Wilkinson Ali Ahmed Foster Ellis Murphy Chapman Mason Gray Richards Webb Griffiths Hunt Palmer Campbell Holmes "
    "Müller Schmidt Schneider Fischer Weber Meyer Wagner Becker Schulz Hoffmann Martin Bernard Dubois Thomas Robert "
    "Richard Petit Durand Leroy Moreau García Fernández González Rodríguez López Martínez Sánchez Pérez Rossi Russo "
    "Ferrari Esposito Bianchi Romano Colombo Nowak Kowalski Wiśniewski Wójcik de Jong Jansen de Vries van den Berg "
    "Bakker Murphy O'Brien Byrne Ryan O'Sullivan Walsh O'Connor McCarthy Doyle"
)
LAST_NAMES = _LAST_NAMES.split()
CITIES = (
    ("GB", "London"), ("GB", "Manchester"), ("GB", "Birmingham"), ("GB", "Leeds"), ("GB", "Glasgow"), ("GB", "Bristol"),
    ("GB", "Edinburgh"), ("GB", "Cardiff"), ("GB", "Norwich"), ("GB", "York"), ("IE", "Dublin"), ("IE", "Cork"),
    ("DE", "Berlin"), ("DE", "Hamburg"), ("DE", "München"), ("DE", "Köln"), ("AT", "Wien"), ("FR", "Paris"),
    ("FR", "Lyon"), ("FR", "Marseille"), ("ES", "Madrid"), ("ES", "Barcelona"), ("IT", "Milano"), ("IT", "Roma"),
    ("NL", "Amsterdam"), ("NL", "Utrecht"), ("PL", "Warszawa"), ("PL", "Kraków"), ("US", "Boston"), ("US", "Chicago"),
    ("SE", "Stockholm"), ("DK", "København"),
)  # fmt: skip
STREET_KINDS = ("Street", "Road", "Lane", "Avenue", "Close", "Way", "Gardens", "Place", "Crescent", "Terrace", "Drive")
MAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.example", "post.example", "inbox.example")
CATEGORIES = (
    "Home & Garden", "Electronics", "Kitchen", "Books", "Toys & Games", "Sports & Outdoors", "Health & Beauty",
    "Clothing", "Shoes", "Jewellery", "Office Supplies", "Pet Supplies", "Baby", "Automotive", "DIY & Tools",
    "Music", "Films & TV", "Video Games", "Computers", "Phones & Accessories", "Garden Furniture", "Lighting",
    "Bedding", "Bath", "Groceries", "Wine & Spirits", "Arts & Crafts", "Stationery", "Luggage", "Watches",
)  # fmt: skip
# (weight, transform) of the spellings staff typed into v1's free-text category field.
CATEGORY_VARIANTS: tuple[tuple[int, Callable[[str], str]], ...] = (
    (70, lambda s: s),
    (8, str.lower),
    (4, str.upper),
    (5, lambda s: s + " "),
    (4, lambda s: " " + s),
    (4, lambda s: s.replace(" ", "  ")),
    (3, lambda s: s.replace(" ", "\u00a0", 1)),
    (2, lambda s: "  " + s.title() + "  "),
)
ORDER_STATUSES = (("delivered", 55), ("shipped", 12), ("paid", 15), ("pending", 6), ("cancelled", 7), ("refunded", 5))
CURRENCIES = (("GBP", 78), ("EUR", 17), ("USD", 5))
PROVIDERS = ("stripe", "adyen", "paypal", "klarna", "worldpay")
CARD_BRANDS = ("visa", "mastercard", "amex", "maestro")
THEMES = ("light", "dark", "system")


def _ri(rng: random.Random, low: int, high: int) -> int:
    """rng.randint without its Python-level layers (about 3x faster; same uniform distribution)."""
    return low + int(rng.random() * (high - low + 1))


def _pick(rng: random.Random, seq: Sequence[Any]) -> Any:
    return seq[int(rng.random() * len(seq))]


def _vocabulary(size: int = 6000) -> list[str]:
    """A fixed pseudo-English vocabulary (independent of --seed)."""
    rng = random.Random(20201)  # noqa: S311 - test data, not secrets
    onsets = "b bl br c ch cl cr d dr f fl fr g gl gr h j k l m n p pl pr qu r s sc sh sl sm sn sp st str t th tr v w wh y z"
    nuclei = "a e i o u ai ea ee oo ou ie oa au"
    codas = " b ck d ft g k l ld lk ll m n nd ng nk nt p r rd rk rm rn rt s sh sk st t th x"
    o, n, c = onsets.split(), nuclei.split(), codas.split(" ")
    words: set[str] = set()
    while len(words) < size:
        syllables = _pick(rng, (1, 1, 2, 2, 2, 3, 3, 4))
        words.add("".join(_pick(rng, o) + _pick(rng, n) + _pick(rng, c) for _ in range(syllables)))
    return sorted(words)


VOCAB = _vocabulary()


def parse_size(text: str) -> int:
    """'50MB' -> bytes (binary units: kB = 1024, MB = 1024**2, GB = 1024**3)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size must look like 50MB, 2GB or 800kB, not {text!r}")
    number, unit = float(match.group(1)), match.group(2).upper()
    value = int(number * 1024 ** {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit])
    if value < 1024 * 1024:
        raise argparse.ArgumentTypeError("size must be at least 1MB")
    return value


@dataclass(frozen=True)
class Plan:
    seed: int
    size: int
    orders: int
    customers: int
    products: int
    pages: int

    @classmethod
    def for_size(cls, size: int, seed: int) -> Plan:
        orders = max(100, size // BYTES_PER_ORDER)
        return cls(
            seed=seed,
            size=size,
            orders=orders,
            customers=max(20, orders // ORDERS_PER_CUSTOMER),
            products=max(50, orders // ORDERS_PER_PRODUCT),
            pages=max(10, orders // ORDERS_PER_PAGE),
        )


def _rng(plan: Plan, table: str, chunk: int) -> random.Random:
    return random.Random(f"acme-gen-data:{plan.seed}:{table}:{chunk}")  # noqa: S311 - test data, not secrets


def _chunks(total: int) -> Iterator[tuple[int, int, int]]:
    """(chunk number, first id, last id + 1) over ids 1..total."""
    for number, start in enumerate(range(1, total + 1, CHUNK)):
        yield number, start, min(start + CHUNK, total + 1)


def _esc(value: str) -> str:
    """Escape a value for COPY's text format."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _ts(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(sep=" ")


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(VOCAB, k=_ri(rng, low, high)))


def _sentences(rng: random.Random, low: int, high: int) -> str:
    out = []
    for _ in range(_ri(rng, low, high)):
        text = _words(rng, 5, 16)
        out.append(text[0].upper() + text[1:] + _pick(rng, ".....!?"))
    return " ".join(out)


def _street(rng: random.Random) -> str:
    return f"{_ri(rng, 1, 240)} {_pick(rng, VOCAB).capitalize()} {_pick(rng, STREET_KINDS)}"


def _postcode(rng: random.Random, country: str) -> str:
    if country in ("GB", "IE"):
        letters = "ABCDEFGHJKLMNPRSTUWXYZ"
        outward = f"{_pick(rng, letters)}{_pick(rng, letters)}{_ri(rng, 1, 29)}"
        return f"{outward} {_ri(rng, 1, 9)}{_pick(rng, letters)}{_pick(rng, letters)}"
    return f"{_ri(rng, 1000, 99999):05d}"


def _price(plan: Plan, product_id: int) -> int:
    """Price in cents of a product: a pure function of (seed, id), so order chunks need no lookup."""
    digest = hashlib.blake2b(f"{plan.seed}:price:{product_id}".encode(), digest_size=8).digest()
    return 199 + int.from_bytes(digest, "big") % 49_800


def _category(rng: random.Random) -> str:
    weights = [1.0 / (rank + 1) ** 0.7 for rank in range(len(CATEGORIES))]
    base = rng.choices(CATEGORIES, weights=weights)[0]
    transform = rng.choices([t for _, t in CATEGORY_VARIANTS], weights=[w for w, _ in CATEGORY_VARIANTS])[0]
    return transform(base)


# --- row builders: each returns {table: COPY text} for one chunk -------------------------------------------


def build_customers(plan: Plan, chunk: int, start: int, stop: int) -> dict[str, str]:
    rng = _rng(plan, "customers", chunk)
    customers, profiles = [], []
    for cid in range(start, stop):
        first, last = _pick(rng, FIRST_NAMES), _pick(rng, LAST_NAMES)
        country, city = _pick(rng, CITIES)
        local = re.sub(r"[^a-z0-9.]", "", f"{first}.{last}".lower().replace(" ", "")) or "customer"
        email = f"{local}.{cid}@{_pick(rng, MAIL_DOMAINS)}"
        salt = f"{rng.getrandbits(48):012x}"
        digest = hashlib.sha1(f"{salt}acme-{cid}".encode()).hexdigest()  # noqa: S324 - the legacy format itself
        created = EPOCH_START + (EPOCH_END - EPOCH_START) * (cid - 1) // max(1, plan.customers) + _ri(rng, 0, 86_400)
        phone = f"+44 {_ri(rng, 7000, 7999)} {_ri(rng, 100000, 999999)}" if rng.random() < 0.8 else ""
        customers.append(
            "\t".join(
                (
                    str(cid),
                    _esc(email),
                    _esc(first),
                    _esc(last),
                    phone,
                    _esc(_street(rng)),
                    _esc(city),
                    _postcode(rng, country),
                    country,
                    f"sha1${salt}${digest}",
                    "\\N",
                    _ts(created),
                )
            )
        )
        prefs = {
            "theme": _pick(rng, THEMES),
            "newsletter_topics": rng.sample(CATEGORIES, _ri(rng, 0, 3)),
            "notifications": {"email": rng.random() < 0.7, "sms": rng.random() < 0.2, "push": rng.random() < 0.4},
            "last_viewed": [f"ACME-{_ri(rng, 1, plan.products):07d}" for _ in range(_ri(rng, 0, 5))],
        }
        birth = dt.date(1940, 1, 1) + dt.timedelta(days=_ri(rng, 0, 365 * 65)) if rng.random() < 0.7 else None
        profiles.append(
            "\t".join(
                (
                    str(cid),
                    _esc(_sentences(rng, 0, 3)),
                    birth.isoformat() if birth else "\\N",
                    "t" if rng.random() < 0.35 else "f",
                    _esc(json.dumps(prefs, ensure_ascii=False)),
                    _ts(created + _ri(rng, 0, 400 * 86_400)),
                    str(cid),
                )
            )
        )
    return {"customers": "\n".join(customers) + "\n", "profiles": "\n".join(profiles) + "\n"}


def build_products(plan: Plan, chunk: int, start: int, stop: int) -> dict[str, str]:
    rng = _rng(plan, "products", chunk)
    rows = []
    for pid in range(start, stop):
        name = " ".join(w.capitalize() for w in rng.choices(VOCAB, k=_ri(rng, 2, 4)))
        cents = _price(plan, pid)
        created = EPOCH_START + _ri(rng, 0, EPOCH_END - EPOCH_START)
        rows.append(
            "\t".join(
                (
                    str(pid),
                    f"ACME-{pid:07d}",
                    _esc(name),
                    _esc(_sentences(rng, 2, 8)),
                    _esc(_category(rng)),
                    f"{cents // 100}.{cents % 100:02d}",
                    str(_ri(rng, 0, 500)),
                    _ts(created),
                )
            )
        )
    return {"products": "\n".join(rows) + "\n"}


def build_pages(plan: Plan, chunk: int, start: int, stop: int) -> dict[str, str]:
    rng = _rng(plan, "cms_pages", chunk)
    rows = []
    for pid in range(start, stop):
        title = " ".join(w.capitalize() for w in rng.choices(VOCAB, k=_ri(rng, 2, 6)))
        slug = "-".join(title.lower().split())[:100] + f"-{pid}"
        body = "\n\n".join(_sentences(rng, 2, 7) for _ in range(_ri(rng, 2, 8)))
        created = EPOCH_START + _ri(rng, 0, EPOCH_END - EPOCH_START)
        rows.append(
            "\t".join(
                (
                    str(pid),
                    slug,
                    _esc(title),
                    _esc(body),
                    "t" if rng.random() < 0.9 else "f",
                    _ts(created),
                    _ts(created + _ri(rng, 0, 200 * 86_400)),
                )
            )
        )
    return {"cms_pages": "\n".join(rows) + "\n"}


def build_orders(plan: Plan, chunk: int, start: int, stop: int) -> dict[str, str]:
    rng = _rng(plan, "orders", chunk)
    orders, items, payments = [], [], []
    statuses, status_w = zip(*ORDER_STATUSES)
    currencies, currency_w = zip(*CURRENCIES)
    item_id = (start - 1) * 3  # at most 3 ids per order below: ids stay unique without coordination
    pay_id = (start - 1) * 2
    span = EPOCH_END - EPOCH_START
    for oid in range(start, stop):
        customer = _ri(rng, 1, plan.customers)
        status = rng.choices(statuses, weights=status_w)[0]
        currency = rng.choices(currencies, weights=currency_w)[0]
        created = EPOCH_START + span * (oid - 1) // plan.orders + _ri(rng, 0, 3600)
        total = 0
        for _ in range(_pick(rng, (1, 1, 2, 2, 2, 3, 3))):
            item_id += 1
            product = _ri(rng, 1, plan.products)
            cents = _price(plan, product)
            quantity = _pick(rng, (1, 1, 1, 1, 2, 2, 3, 5))
            total += cents * quantity
            items.append(f"{item_id}\t{quantity}\t{cents // 100}.{cents % 100:02d}\t{oid}\t{product}")
        item_id = oid * 3
        country, city = _pick(rng, CITIES)
        recipient = f"{_pick(rng, FIRST_NAMES)} {_pick(rng, LAST_NAMES)}"
        address = f"{recipient}\n{_street(rng)}\n{_postcode(rng, country)} {city}\n{country}"
        notes = _sentences(rng, 1, 6) if rng.random() < 0.75 else ""
        amount = f"{total // 100}.{total % 100:02d}"
        orders.append(
            "\t".join(
                (
                    str(oid),
                    status,
                    currency,
                    amount,
                    _esc(address),
                    _esc(notes),
                    _ts(created),
                    _ts(created + _ri(rng, 60, 14 * 86_400)),
                    str(customer),
                )
            )
        )
        if status == "pending":
            attempts = []
        elif rng.random() < 0.08:
            attempts = ["failed", _paid_status(status)]
        else:
            attempts = [_paid_status(status)]
        for n, pay_status in enumerate(attempts):
            pay_id += 1
            provider = _pick(rng, PROVIDERS)
            details = {
                "card": {
                    "brand": _pick(rng, CARD_BRANDS),
                    "last4": f"{_ri(rng, 0, 9999):04d}",
                    "exp": f"{_ri(rng, 1, 12):02d}/{_ri(rng, 25, 32)}",
                },
                "three_ds": _pick(rng, ("frictionless", "challenge", "not_enrolled")),
                "risk_score": round(rng.random() * 100, 2),
                "ip": f"{_ri(rng, 1, 223)}.{_ri(rng, 0, 255)}.{_ri(rng, 0, 255)}.{_ri(rng, 1, 254)}",
                "billing": {"name": f"{_pick(rng, FIRST_NAMES)} {_pick(rng, LAST_NAMES)}", "city": city, "country": country},
                "provider_message": _words(rng, 1, 4),
            }
            if pay_status == "failed":
                details["decline_code"] = _pick(rng, ("insufficient_funds", "do_not_honor", "expired_card", "fraudulent"))
            reference = f"{provider[:2]}_{rng.getrandbits(96):024x}"
            payments.append(
                "\t".join(
                    (
                        str(pay_id),
                        amount,
                        currency,
                        pay_status,
                        provider,
                        reference,
                        _esc(json.dumps(details, ensure_ascii=False)),
                        _ts(created + 30 + n * 300),
                        str(oid),
                    )
                )
            )
        pay_id = oid * 2
    return {
        "orders": "\n".join(orders) + "\n",
        "order_items": "\n".join(items) + "\n",
        "payments": ("\n".join(payments) + "\n") if payments else "",
    }


def _paid_status(order_status: str) -> str:
    return {"refunded": "refunded", "cancelled": "refunded"}.get(order_status, "captured")


COLUMNS = {
    "customers": (
        "id, email, first_name, last_name, phone, street, city, postal_code, country, legacy_password, user_id, created_at"
    ),
    "profiles": "id, bio, birth_date, newsletter, preferences, updated_at, customer_id",
    "products": "id, sku, name, description, category, price, inventory, created_at",
    "cms_pages": "id, slug, title, body, published, created_at, updated_at",
    "orders": "id, status, currency, total, shipping_address, notes, created_at, updated_at, customer_id",
    "order_items": "id, quantity, unit_price, order_id, product_id",
    "payments": "id, amount, currency, status, provider, provider_reference, details, created_at, order_id",
}
BUILDERS: dict[str, Callable[[Plan, int, int, int], dict[str, str]]] = {
    "customers": build_customers,
    "products": build_products,
    "cms_pages": build_pages,
    "orders": build_orders,
}


# --- loading -----------------------------------------------------------------------------------------------


def _connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=False, application_name="gen_data")


def load_chunk(dsn: str, plan_fields: dict[str, int], builder: str, chunk: int, start: int, stop: int) -> dict[str, int]:
    """Build one chunk and COPY it in one transaction; returns bytes of COPY text per table."""
    plan = Plan(**plan_fields)
    data = BUILDERS[builder](plan, chunk, start, stop)
    sent: dict[str, int] = {}
    with _connect(dsn) as conn:
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        if superuser and superuser[0]:
            conn.execute("SET LOCAL session_replication_role = replica")
        for table, text in data.items():
            if not text:
                continue
            query = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(table), sql.SQL(COLUMNS[table]))
            with conn.cursor().copy(query) as copy:
                copy.write(text)
            sent[table] = len(text.encode())
    return sent


def check_schema(conn: psycopg.Connection[Any], truncate: bool) -> None:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = 'products' AND column_name = 'category' AND data_type = 'character varying'"
    ).fetchall()
    missing = [t for t in TABLES if conn.execute("SELECT to_regclass(%s)", [t]).fetchone() in (None, (None,))]
    if missing or not rows:
        raise SystemExit(
            "gen_data: this is not the ACME v1 schema (missing: "
            + (", ".join(missing) or "products.category varchar")
            + "): run `manage.py migrate` of release v1 on this database first"
        )
    if truncate:
        conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(sql.SQL(", ").join(map(sql.Identifier, TABLES))))
        conn.commit()
        return
    for table in TABLES:
        if conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(sql.Identifier(table))).fetchone() == (True,):
            raise SystemExit(f"gen_data: table {table} is not empty; use a fresh database or pass --truncate")


def finish(conn: psycopg.Connection[Any]) -> None:
    """Move every sequence past the ids COPY wrote, then VACUUM (ANALYZE): the visibility and free
    space maps exist before the sizes are measured (an autovacuum after the report made them later,
    and the database 24 kB larger than reported), and no page is left for a later hint-bit write."""
    for table in TABLES:
        conn.execute(
            sql.SQL("SELECT setval(pg_get_serial_sequence({name}, 'id'), coalesce(max(id), 0) + 1, false) FROM {table}").format(
                name=sql.Literal(table), table=sql.Identifier(table)
            )
        )
    conn.commit()
    conn.autocommit = True
    conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.SQL(", ").join(map(sql.Identifier, TABLES))))
    conn.autocommit = False


def measure(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, int]]:
    """{table: (rows, pg_total_relation_size)}: one query per table."""
    result = {}
    for table in TABLES:
        row = conn.execute(
            sql.SQL("SELECT count(*), pg_total_relation_size({}) FROM {}").format(sql.Literal(table), sql.Identifier(table))
        ).fetchone()
        assert row is not None
        result[table] = (int(row[0]), int(row[1]))
    conn.commit()
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", required=True, help="libpq connection string of the migrated v1 database")
    parser.add_argument("--size", required=True, type=parse_size, help="target size on disk: 5MB, 200MB, 2GB ...")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1); same seed + size = same data")
    parser.add_argument("--jobs", type=int, default=1, help="parallel loader processes (default 1)")
    parser.add_argument("--truncate", action="store_true", help="empty the seven tables first instead of refusing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.for_size(args.size, args.seed)
    started = time.monotonic()
    try:
        with _connect(args.dsn) as conn:
            check_schema(conn, args.truncate)
    except psycopg.Error as exc:
        print(f"gen_data: cannot use the database: {str(exc).strip()}", file=sys.stderr)
        return 2
    fields = asdict(plan)
    # Parents first (FK checks run when not a superuser), then profiles and orders with items and payments.
    phases = [
        [("customers", *c) for c in _chunks(plan.customers)]
        + [("products", *c) for c in _chunks(plan.products)]
        + [("cms_pages", *c) for c in _chunks(plan.pages)],
        [("orders", *c) for c in _chunks(plan.orders)],
    ]
    sent: dict[str, int] = dict.fromkeys(TABLES, 0)
    if args.jobs == 1:
        for phase in phases:
            for builder, chunk, start, stop in phase:
                for table, n in load_chunk(args.dsn, fields, builder, chunk, start, stop).items():
                    sent[table] += n
    else:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for phase in phases:
                futures = [pool.submit(load_chunk, args.dsn, fields, *task) for task in phase]
                for future in futures:
                    for table, n in future.result().items():
                        sent[table] += n
    loaded = time.monotonic()
    with _connect(args.dsn) as conn:
        finish(conn)
        sizes = measure(conn)
    elapsed = time.monotonic() - started
    total = sum(b for _, b in sizes.values())
    report = {
        "seed": plan.seed,
        "target_bytes": plan.size,
        "total_bytes": total,
        "copy_bytes": sum(sent.values()),
        "seconds": round(elapsed, 2),
        "load_seconds": round(loaded - started, 2),
        "mb_per_s": round(total / 2**20 / elapsed, 2) if elapsed else None,
        "tables": {t: {"rows": r, "bytes": b, "share": round(b / total, 4) if total else 0} for t, (r, b) in sizes.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'table':<12} {'rows':>12} {'bytes':>14} {'share':>7}")
    for table, info in report["tables"].items():
        print(f"{table:<12} {info['rows']:>12,} {info['bytes']:>14,} {info['share'] * 100:>6.1f}%")
    print(f"{'total':<12} {sum(r for r, _ in sizes.values()):>12,} {total:>14,}")
    print(
        f"generated {total / 2**20:.1f} MB (target {plan.size / 2**20:.0f} MB) in {elapsed:.1f} s"
        f" = {report['mb_per_s']} MB/s on disk, {report['copy_bytes'] / 2**20 / max(loaded - started, 1e-9):.1f} MB/s"
        f" of COPY text; orders share {report['tables']['orders']['share'] * 100:.1f}% (seed {plan.seed}, jobs {args.jobs})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
