"""How a v1 free-text category maps to a v2 Category (used by migration 0003).

Deterministic: the same strings always give the same keys, names and slugs,
whatever order the rows come in.
"""

import re
import unicodedata

UNCATEGORIZED = "uncategorized"


def category_key(raw):
    """Case- and whitespace-insensitive identity of a category string."""
    key = " ".join(unicodedata.normalize("NFKC", raw or "").split()).casefold()
    return key or UNCATEGORIZED


def display_name(key):
    """Title-case each word of the key: 'home & garden' -> 'Home & Garden'."""
    return " ".join(word[:1].upper() + word[1:] for word in key.split(" "))[:100]


def slug_base(key):
    ascii_key = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", ascii_key.lower()).strip("-")[:110] or "category"


def plan(raw_values):
    """Map each raw string to its key, and each key (sorted) to (name, unique slug)."""
    key_of = {raw: category_key(raw) for raw in raw_values}
    categories = {}
    used = set()
    for key in sorted(set(key_of.values())):
        base = slug_base(key)
        slug, n = base, 1
        while slug in used:
            n += 1
            slug = f"{base}-{n}"
        used.add(slug)
        categories[key] = (display_name(key), slug)
    return key_of, categories
