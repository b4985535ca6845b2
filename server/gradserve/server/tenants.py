"""Tenants of --auth-tokens: the token file's format, the calling tenant of an RPC, and who may see which model."""

from __future__ import annotations

import contextvars
import hmac

ADMIN_TENANT = "admin"  # the tenant of this name sees (and may change) every model
TENANT_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")

# The calling tenant, set by the bearer-token interceptor around the handler
# (None: no --auth-tokens, nothing is scoped).
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("gradserve_tenant", default=None)


# The "tenant" of the single --auth-token: the call is let in and scoped to nothing.
SINGLE_TOKEN = object()


def current_tenant() -> str | None:
    return _current.get()


def set_current_tenant(tenant: str | None) -> None:
    """Sets the calling tenant in the current context (run it inside a
    ``contextvars.Context.run`` of the call, as app.as_tenant does)."""
    _current.set(tenant)


def visible_to(owner: str, tenant: str | None) -> bool:
    """Whether a model owned by ``owner`` ("" for none) is visible to
    ``tenant``: everything is to None (unscoped) and to the admin; otherwise
    only the tenant's own models."""
    return tenant is None or tenant == ADMIN_TENANT or owner == tenant


def parse_tokens(text: str, source: str = "--auth-tokens") -> dict[str, str]:
    """``tenant token`` per line, blank lines and ``#`` comments ignored;
    returns {token: tenant}. A tenant may have several tokens (rotation); a
    token may not appear twice. Raises ValueError naming the line."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}: line {number}: expected 'tenant token', got {len(parts)} fields")
        tenant, token = parts
        if not set(tenant) <= TENANT_NAME_CHARS or len(tenant) > 64:
            raise ValueError(f"{source}: line {number}: tenant {tenant!r}: use 1-64 characters from "
                             "A-Z a-z 0-9 . _ -")
        if len(token) < 16:
            raise ValueError(f"{source}: line {number}: the token of {tenant!r} is {len(token)} characters; "
                             "use at least 16")
        if token in tokens:
            raise ValueError(f"{source}: line {number}: a token given twice (tenants {tokens[token]!r} and "
                             f"{tenant!r})")
        tokens[token] = tenant
    if not tokens:
        raise ValueError(f"{source}: no 'tenant token' lines")
    return tokens


def tenant_of(authorization: str, tokens: dict[str, object]):
    """The tenant whose token ``authorization`` ("Bearer <token>") carries,
    or None. Compares against every token with hmac.compare_digest, without
    stopping early, so the time taken does not tell which one matched."""
    given = authorization.encode()
    found = None
    for token, tenant in tokens.items():
        if hmac.compare_digest(given, f"Bearer {token}".encode()) and found is None:
            found = tenant
    return found
