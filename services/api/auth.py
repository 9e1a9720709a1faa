"""Who is calling: a bearer token checked against the bootstrap admin key and the key store.

Verified keys are trusted for ``cache_seconds`` (default 2 s) so that a busy route costs no
Redis lookup per request; a revoked key (``flowcloud apikeys revoke``) stops working within that
window. A response that outlives a request (``/live``) asks ``still_valid`` again while it streams;
a key found revoked there is dropped from the cache at once.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from services.api.apikeys import ALL_TENANTS, BOOTSTRAP_ID, ApiKey, ApiKeyStore, split_token

MAX_CACHED = 1024
MAX_TOKEN_CHARS = 1024  # longer bearer values are refused before hashing


class Authenticator:
    def __init__(self, store: ApiKeyStore, admin_key: str | None = None, cache_seconds: float = 2.0) -> None:
        self.store = store
        self._admin_digest = hashlib.sha256(admin_key.encode()).digest() if admin_key else None
        self._bootstrap = ApiKey(BOOTSTRAP_ID, "admin", ALL_TENANTS, created=time.time())
        self.cache_seconds = cache_seconds
        # sha256(token) -> (key, expiry on the monotonic clock); the token itself is not kept.
        self._cache: dict[bytes, tuple[ApiKey, float]] = {}

    async def authenticate(self, token: str) -> ApiKey | None:
        """The key a bearer token stands for, or None when it stands for none."""
        if len(token) > MAX_TOKEN_CHARS:
            return None
        digest = hashlib.sha256(token.encode(errors="replace")).digest()
        if self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            return self._bootstrap
        if split_token(token) is None:
            return None
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        key = await self.store.verify(token)
        if key is not None and self.cache_seconds > 0:
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = (key, now + self.cache_seconds)
        return key

    async def still_valid(self, key: ApiKey) -> bool:
        """Whether ``key`` still exists and is not revoked, asked of the store (never the cache).
        The bootstrap key lives in the settings: it stays valid for the life of the process."""
        if key is self._bootstrap:
            return True
        stored = await self.store.get(key.key_id)
        if stored is not None and stored.active:
            return True
        for digest in [d for d, (cached, _expiry) in self._cache.items() if cached.key_id == key.key_id]:
            del self._cache[digest]
        return False
