"""The legacy shop's password format: ``sha1$<salt>$<hex sha1(salt + password)>``."""

import hashlib
import hmac

ALGORITHM = "sha1"


def make_legacy_hash(password, salt):
    # The legacy format is SHA-1 by definition; it is only verified, then replaced (backends.py).
    digest = hashlib.sha1((salt + password).encode("utf-8")).hexdigest()  # noqa: S324
    return f"{ALGORITHM}${salt}${digest}"


def verify_legacy_hash(password, encoded):
    try:
        algorithm, salt, digest = encoded.split("$", 2)
    except ValueError:
        return False
    if algorithm != ALGORITHM or not salt or not digest:
        return False
    candidate = make_legacy_hash(password, salt)
    return hmac.compare_digest(candidate.encode("utf-8"), encoded.encode("utf-8"))
