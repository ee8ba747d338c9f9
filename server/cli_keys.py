"""``tuneloop keys``: create, list and revoke API keys.

Contract: :func:`register` adds the ``keys`` group (``server/cli.py`` calls it).
The secret of a new key is printed once, on stdout, alone on its line (so
``KEY=$(tuneloop keys create --quiet)`` works); only its sha256 is stored.
``list`` never prints secrets. Keys take effect on a running server within a
few seconds (it re-reads the key table). Light imports only at module level.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tuneloop.cli import add_group

if TYPE_CHECKING:  # pragma: no cover
    from tuneloop.cli import Context
    from tuneloop.server.auth import ApiKey


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = add_group(sub, "keys", "API keys for the /v1 API and the admin API (create, list, revoke)")

    p = g.add_parser(
        "create",
        help="create an API key and print its secret once",
        description="Create an API key. The secret is printed once and cannot be shown again: only its sha256 "
        "is stored. Once any key exists, the server requires a key on /v1 "
        "('Authorization: Bearer <key>') and an admin key on admin routes. "
        "Example: tuneloop keys create --scope inference --name web-app",
    )
    p.add_argument(
        "--scope",
        choices=["inference", "admin"],
        default="inference",
        help="inference: the /v1 API; admin: admin routes and /v1 (default: inference)",
    )
    p.add_argument("--name", help="a label to recognise the key by (unique among active keys)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the secret (for scripts)")
    p.add_argument("--json", action="store_true", help="print the new key (with its secret) as JSON")
    p.set_defaults(handler=cmd_create)

    p = g.add_parser(
        "list",
        help="list API keys (id, name, scope, prefix, created, revoked); never the secrets",
        description="List API keys. Secrets are not stored and never shown; 'prefix' is the "
        "first characters of the secret, to recognise it.",
    )
    p.add_argument("--active", action="store_true", help="hide revoked keys")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_list)

    p = g.add_parser(
        "revoke",
        help="revoke an API key (takes effect on a running server within seconds)",
        description="Revoke an API key by id, display prefix or active name. Requests with it are "
        "then rejected with 401. Revoking every key does not reopen the API.",
    )
    p.add_argument("id", help="key id (from `tuneloop keys list`), its prefix (tl-...) or its name")
    p.set_defaults(handler=cmd_revoke)


def _fmt_time(t: datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


def _as_dict(k: ApiKey) -> dict[str, Any]:
    return {
        "id": k.id,
        "name": k.name,
        "scope": k.scope,
        "prefix": k.prefix,
        "created_at": _fmt_time(k.created_at),
        "revoked_at": _fmt_time(k.revoked_at),
    }


def cmd_create(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.server.auth import create_key

    key, secret = create_key(ctx.db, args.scope, args.name)
    if args.json:
        print(json.dumps({**_as_dict(key), "secret": secret}))
    elif args.quiet:
        print(secret)
    else:
        print(f"created {key.scope} key {key.id}" + (f" ({key.name})" if key.name else ""))
        print(secret)
    if not args.quiet:
        print(
            "warning: this is the only time the secret is shown; store it now (only its hash is kept).", file=sys.stderr
        )
    return 0


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.server.auth import list_keys
    from tuneloop.table import print_table

    keys = list_keys(ctx.db, include_revoked=not args.active)
    if args.json:
        print(json.dumps([_as_dict(k) for k in keys]))
        return 0
    if not keys:
        print("no API keys: the API is open. Create one with `tuneloop keys create --scope inference`.")
        return 0
    print_table(
        ["id", "name", "scope", "prefix", "created_at", "revoked_at"],
        [[k.id, k.name, k.scope, k.prefix + "...", _fmt_time(k.created_at), _fmt_time(k.revoked_at)] for k in keys],
    )
    return 0


def cmd_revoke(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.server.auth import revoke_key

    key = revoke_key(ctx.db, args.id)
    print(f"revoked {key.scope} key {key.id}" + (f" ({key.name})" if key.name else ""))
    return 0
