"""Secrets for devices and API keys: generated here, stored only as salted hashes, compared in
constant time. Tokens are 256-bit random values, so one salted SHA-256 is enough (no password
stretching is needed for secrets nobody chose)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_BYTES = 32
MAX_TOKEN_LENGTH = 256  # anything longer is refused before hashing


def new_token() -> str:
    """A fresh URL-safe token (43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def new_salt() -> str:
    return secrets.token_hex(16)


def hash_token(token: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{token}".encode()).hexdigest()


def verify_token(token: str, salt: str, expected_hash: str) -> bool:
    """True when ``token`` hashes to ``expected_hash``; constant time in the token's content."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return False
    return hmac.compare_digest(hash_token(token, salt), expected_hash)
