"""What keeps one account's requests one account's on the shared workers, for every API.

vLLM's prefix cache is shared by every request a worker serves; a salt (`cache_salt`) keeps
requests with different salts from reusing each other's cached blocks, so an account cannot
learn another's prompts from cache timing, nor read them back through the cache. The salt is
set here, on the shared path, on every worker request of every API, after the API's
translation and whatever the client sent: an API says only which of its account's caches a
request shares (its Call's `cache_scope`). Client-named engine fields never get this far:
the Fireworks request models refuse unknown fields, the Anthropic ones name the fields they
take (tests/unit/dataplane/test_isolation.py sends them to every API in the route table).
"""

from __future__ import annotations

import hashlib

from gateway.api import Call


def account_salt(account: str, scope: str) -> str:
    """The salt of an account's requests that share `scope` ("" the account's own cache)."""
    return hashlib.sha256(f"{account}\0{scope}".encode()).hexdigest()[:32]


def isolate(call: Call, account: str, nonce: str) -> None:
    """Salt the worker request with its account (a request that shares no cache gets a salt
    of its own, from its nonce)."""
    scope = nonce if call.cache_scope is None else call.cache_scope
    call.body["cache_salt"] = account_salt(account, scope)
