"""`bios keys create|revoke|list`: the server's API keys."""

from __future__ import annotations

import argparse
import sys

from bios.commands.serve import server_home


def run(args: argparse.Namespace) -> int:
    from bios.server.auth import hash_key, key_prefix, new_key
    from bios.server.store import Store

    store = Store(server_home(args) / "bios.sqlite3")
    if args.action == "create":
        if not args.tenant:
            print("bios keys create: --tenant NAME is required", file=sys.stderr)
            return 2
        key = new_key()
        store.add_key(hash_key(key), key_prefix(key), args.tenant)
        print(key)
        print(f"(tenant {args.tenant}; shown once, stored only as a hash)", file=sys.stderr)
    elif args.action == "revoke":
        if not args.key:
            print("bios keys revoke: give the key or its prefix", file=sys.stderr)
            return 2
        revoked = store.revoke_keys(key_prefix(args.key))
        print(f"revoked {revoked} key(s)")
        return 0 if revoked else 1
    else:
        for row in store.keys():
            status = "revoked" if row["revoked"] else "active"
            print(f"{row['key_prefix']}…  tenant={row['tenant']}  {status}")
    return 0


def add(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("keys", help="create, revoke or list the server's API keys")
    parser.add_argument("action", choices=["create", "revoke", "list"])
    parser.add_argument("key", nargs="?", help="revoke: the key, or its first characters")
    parser.add_argument("--tenant", help="create: the tenant the key acts for")
    parser.add_argument("--home", help="the server's home (default: $BIOS_HOME/server)")
    parser.set_defaults(run=run)
