"""The ``chatgate`` command: serve, check the configuration, list plugins, manage keys and users,
copy the store."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import __version__
from .config import Config, load_config
from .errors import ChatgateError, ConfigError, NotFound
from .hosts import is_loopback
from .money import format_amount, parse_amount
from .plugins import Plugins, Setup
from .services.accounts import Accounts, normalize_email
from .services.billing import Billing
from .store import Store
from .store_copy import copy_store


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 bad usage or configuration)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        result: int = args.run(args)
        return result
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except ChatgateError as exc:
        print(f"chatgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatgate", description="A self-hosted gateway for chatting with LLMs."
    )
    parser.add_argument("--version", action="version", version=f"chatgate {__version__}")
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    # Every command that reads the configuration takes --config after its own name.
    configured = argparse.ArgumentParser(add_help=False)
    configured.add_argument(
        "--config",
        default=os.environ.get("CHATGATE_CONFIG", "plugins.toml"),
        help="configuration file (default: $CHATGATE_CONFIG or ./plugins.toml)",
    )

    def command(
        name: str, run: Callable[[argparse.Namespace], int], help_: str, *, group: bool = False
    ) -> argparse.ArgumentParser:
        parents = [] if group else [configured]
        sub = commands.add_parser(name, help=help_, description=help_, parents=parents)
        sub.set_defaults(command=name, run=run)
        return sub

    serve = command("serve", run_serve, "Start the server.")
    serve.add_argument("--host", help="interface to bind (default: [server] host)")
    serve.add_argument("--port", type=port_number, help="port to bind (default: [server] port)")
    serve.add_argument("--workers", type=positive_int, help="worker processes (default: [server] workers)")
    command("check", run_check, "Validate the configuration and show what it enables.")
    command("plugins", run_plugins, "List the installed plugins and whether the configuration enables them.")

    keys = command("keys", lambda a: usage(keys), "Manage API keys.", group=True)
    key_commands = keys.add_subparsers(title="key commands", metavar="ACTION")
    create = key_commands.add_parser(
        "create", help="create a key; the key is printed once, as the last line", parents=[configured]
    )
    create.add_argument("--email", required=True, help="owner's email (the user is created if new)")
    create.add_argument("--name", default="", help="a label to recognise the key by")
    create.add_argument("--balance", type=credit, help="credits to add to the owner's balance (>= 0)")
    create.set_defaults(run=store_command(keys_create))
    listing = key_commands.add_parser("list", help="list keys (never their secrets)", parents=[configured])
    listing.add_argument("--email", help="only this user's keys")
    listing.set_defaults(run=store_command(keys_list))
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id", parents=[configured])
    revoke.add_argument("id", type=positive_int, help="the key's id (see `keys list`)")
    revoke.set_defaults(run=store_command(keys_revoke))

    users = command("users", lambda a: usage(users), "Manage users and balances.", group=True)
    user_commands = users.add_subparsers(title="user commands", metavar="ACTION")
    user_list = user_commands.add_parser("list", help="list users and balances", parents=[configured])
    user_list.set_defaults(run=store_command(users_list))
    topup = user_commands.add_parser(
        "topup", help="add credits to a user's balance (negative takes away)", parents=[configured]
    )
    topup.add_argument("email")
    topup.add_argument("amount", type=amount, help="credits, e.g. 10 or 2.5")
    topup.set_defaults(run=store_command(users_topup))

    stores = command("store", lambda a: usage(stores), "Move the store's content.", group=True)
    store_commands = stores.add_subparsers(title="store commands", metavar="ACTION")
    copy = store_commands.add_parser(
        "copy",
        help="copy users, keys, balances, the ledger and conversations, ids and all, into the empty "
        "store another configuration names (SQLite to PostgreSQL, say)",
        parents=[configured],
    )
    copy.add_argument(
        "--to", required=True, metavar="OTHER.toml", help="the configuration whose [store] receives the copy"
    )
    copy.set_defaults(run=run_store_copy)
    return parser


def usage(parser: argparse.ArgumentParser) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: choose an action", file=sys.stderr)
    return 2


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return value


def amount(text: str) -> int:
    try:
        return parse_amount(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def credit(text: str) -> int:
    value = amount(text)
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is negative; use `chatgate users topup` to take credits away"
        )
    return value


def configure(path: str) -> tuple[Config, Plugins, Setup]:
    plugins = Plugins.load()
    config, setup = plugins.check(path)
    return config, plugins, setup


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .http_server import uvicorn_options

    config, _, _ = configure(args.config)  # fail here, readably, rather than in every worker
    options = uvicorn_options(config.server, host=args.host, port=args.port)
    # What every worker's app_from_environment reads: the file, and the address it is served on
    # (the Host check depends on it, and --host may differ from [server] host).
    os.environ["CHATGATE_CONFIG"] = os.path.abspath(args.config)
    os.environ["CHATGATE_HOST"] = options["host"]
    uvicorn.run(
        "core.app:app_from_environment",
        factory=True,
        workers=args.workers or config.server.workers,
        log_level="info",
        **options,
    )
    return 0


def run_check(args: argparse.Namespace) -> int:
    config, _, setup = configure(args.config)
    print(f"{config.path}: OK")
    print(f"store:     {setup.store.registered.name}")
    providers = [f"{name} ({c.registered.name})" for name, c in setup.providers.items()]
    print(f"providers: {', '.join(providers) or 'none'}")
    print(f"surfaces:  {', '.join(setup.surfaces) or 'none'}", end="")
    print(f" (disabled: {', '.join(setup.disabled_surfaces)})" if setup.disabled_surfaces else "")
    models = [f"{name} -> {m.provider}" for name, m in config.models.items()]
    print(f"models:    {', '.join(models) or 'none'}")
    for line in warnings(config, setup):
        print(f"warning: {line}")
    return 0


def warnings(config: Config, setup: Setup) -> list[str]:
    """What a valid configuration likely did not mean."""
    found = []
    for name, configured in setup.surfaces.items():
        if (
            configured.registered.name == "email_socket"
            and getattr(configured.options, "allow", None) is None
            and not is_loopback(config.server.host)
        ):
            found.append(
                f"[surfaces.{name}] allow is unset and [server] host = {config.server.host!r} is not "
                "a loopback address: the email surface admits only loopback callers without proxy "
                "headers; set allow to the addresses it should serve"
            )
    workers = config.server.workers
    if setup.store.registered.name == "sqlite" and workers > SQLITE_WORKERS:
        found.append(
            f"[server] workers = {workers} on the sqlite store: SQLite lets one process write at a time, "
            "so writes (each chat turn, each charge) do not go faster with more workers (about 20,000 "
            "a second in all, measured on 2 cores with 1 to 8 processes); for many workers or several "
            'instances use PostgreSQL ([store] plugin = "postgres")'
        )
    return found


SQLITE_WORKERS = 2
"""The most workers ``chatgate check`` takes on SQLite without a word: two still doubled the
requests served on 16 cores (2,900 to 6,600 a second); more bring busy chat traffic's writes
(4 to 6 a turn) near what the one writer does (about 20,000 a second on 2 cores)."""


def run_plugins(args: argparse.Namespace) -> int:
    plugins = Plugins.load()
    enabled: dict[str, set[str]] | None
    try:
        config = load_config(args.config)
    except ConfigError:
        enabled = None  # listing what is installed must work without a valid configuration
    else:
        enabled = {
            "store": {config.store.plugin},
            "provider": {t.plugin for t in config.providers.values()},
            "surface": {t.plugin for t in config.surfaces.values() if t.enabled},
            "web_search": {config.web_search.plugin} if config.web_search else set(),
        }
    rows = [("NAME", "KIND", "PACKAGE", "ENABLED")]
    for kind, registered in plugins.listing():
        on = "?" if enabled is None else ("yes" if registered.name in enabled[kind] else "no")
        rows.append((registered.name, kind, registered.package, on))
    print_table(rows)
    if enabled is None:
        print(f"(enabled unknown: {args.config} is missing or invalid; see `chatgate check`)")
    return 0


def print_table(rows: Sequence[Sequence[Any]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def store_command(
    action: Callable[[Store, argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], int]:
    """Run ``action`` against the configured store, opened for the duration."""

    def run(args: argparse.Namespace) -> int:
        store = configured_store(args.config)

        async def session() -> int:
            await store.open()
            try:
                return await action(store, args)
            finally:
                await store.aclose()

        return asyncio.run(session())

    return run


def configured_store(path: str) -> Store:
    """The store the configuration at ``path`` names, not yet opened."""
    _, _, setup = configure(path)
    return setup.store.registered.cls(setup.store.registered.cls.name, setup.store.options)


def run_store_copy(args: argparse.Namespace) -> int:
    source, target = configured_store(args.config), configured_store(args.to)

    def progress(table: str, count: int) -> None:
        print(f"{table}: {count} copied", file=sys.stderr)

    async def session() -> dict[str, int]:
        await source.open()
        try:
            await target.open()
            try:
                return await copy_store(source, target, progress=progress)
            finally:
                await target.aclose()
        finally:
            await source.aclose()

    copied = asyncio.run(session())
    print_table([("TABLE", "ROWS"), *copied.items()])
    print(f"copied {sum(copied.values())} rows; balances match")
    return 0


async def keys_create(store: Store, args: argparse.Namespace) -> int:
    # Top up first: if anything fails, no key exists whose secret was never shown.
    user = await Accounts(store).user_for_email(args.email, allow=["*"])  # the operator may name anyone
    if args.balance:
        await Billing(store, {}).top_up(user.id, args.balance, note="chatgate keys create")
    key, secret = await Accounts(store).create_key(args.email, args.name)
    user = await store.get_user(key.user_id)
    print(f"created key {key.id} ({key.prefix}...) for {user.email}; balance {format_amount(user.balance)}")
    print("store it now: it is shown only once")
    print(secret)
    return 0


async def keys_list(store: Store, args: argparse.Namespace) -> int:
    users = {u.id: u for u in await store.list_users()}
    user_id = None
    if args.email:
        user = await store.find_user(normalize_email(args.email))
        if user is None:
            raise NotFound(f"no user with email {normalize_email(args.email)}")
        user_id = user.id
    rows: list[tuple[Any, ...]] = [("ID", "PREFIX", "EMAIL", "NAME", "CREATED", "STATUS")]
    for key in await store.list_api_keys(user_id):
        status = "active" if key.revoked_at is None else f"revoked {key.revoked_at:%Y-%m-%d %H:%M}"
        rows.append(
            (
                key.id,
                key.prefix + "...",
                users[key.user_id].email,
                key.name,
                f"{key.created_at:%Y-%m-%d %H:%M}",
                status,
            )
        )
    print_table(rows)
    return 0


async def keys_revoke(store: Store, args: argparse.Namespace) -> int:
    key = await store.revoke_api_key(args.id)
    within = f"{Accounts.key_cache_seconds:g} second{'' if Accounts.key_cache_seconds == 1 else 's'}"
    print(f"revoked key {key.id} ({key.prefix}...); running servers refuse it within {within}")
    return 0


async def users_list(store: Store, args: argparse.Namespace) -> int:
    rows: list[tuple[Any, ...]] = [("ID", "EMAIL", "BALANCE", "CREATED")]
    for user in await store.list_users():
        rows.append((user.id, user.email, format_amount(user.balance), f"{user.created_at:%Y-%m-%d %H:%M}"))
    print_table(rows)
    return 0


async def users_topup(store: Store, args: argparse.Namespace) -> int:
    user = await store.find_user(normalize_email(args.email))
    if user is None:
        raise NotFound(f"no user with email {normalize_email(args.email)}; `chatgate keys create` makes one")
    entry = await Billing(store, {}).top_up(user.id, args.amount, note="chatgate users topup")
    print(f"{user.email}: balance {format_amount(entry.balance_after)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
