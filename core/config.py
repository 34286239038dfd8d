"""Loading and validating ``plugins.toml``.

Validation reports every problem at once, one line each::

    plugins.toml:14: providers.deepseek.timeout: expected a number, found "thirty" (a string)

Core sections are checked here; each plugin's table is checked against that
plugin's own ``Options`` struct by :func:`validate_options`, called once the
installed plugins are known (see :mod:`core.plugins`).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import msgspec

from .cors import origin_problem
from .errors import ConfigError, Problem
from .hosts import host_pattern_problem

ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SECTIONS = ("server", "generation", "store", "providers", "models", "surfaces", "web_search")


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``[server]``: where and how ``chatgate serve`` listens."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_body_bytes: int = 1_048_576
    admin_token: str | None = None
    """Guards the admin API and key-management page; unset disables them."""
    shutdown_grace: int = 10
    """Seconds open requests (streams, an /api/chat waiting for its reply) get to end when the
    server stops; then they are cut, and replies still generating are saved as interrupted."""
    access_log: bool = False
    """A line per HTTP request on stderr (off, as gunicorn has it: the ledger already records
    every charged request, and the line's formatting and write cost more CPU than routing it)."""
    header_timeout: float = 10.0
    """Seconds a client gets to send a request's complete headers (from connecting, or from the
    request's first byte on a kept-alive connection), and the longest a request's body may pause
    between two reads; then the connection is closed."""
    keepalive_timeout: float = 5.0
    """Seconds an idle kept-alive connection stays open waiting for its next request."""
    max_connections: int = 1000
    """Open connections per worker process; a request on a connection past it answers 503.
    Keep it below the process's open-file limit (``ulimit -n``)."""
    allowed_hosts: list[str] = []
    """``Host`` names served besides loopback ones (exact names or ``*.domain`` for its
    subdomains; ``*``: any), against DNS rebinding. Empty: while listening on a loopback address
    only loopback names are served; otherwise any. Set: only these and loopback names, whatever
    the address."""
    cors_origins: list[str] = []
    """Web origins (``https://app.example.com``; ``*``: any) whose pages may call every API
    route from a browser (CORS: preflights answered, ``Access-Control-Allow-Origin`` sent).
    Empty: none, as browsers do by default."""
    forwarded_allow_ips: list[str] | str | None = None
    """The reverse proxies (IP addresses or CIDR networks, ``*`` for any) whose
    ``X-Forwarded-For`` / ``X-Forwarded-Proto`` give the client's address and scheme. Unset:
    no proxy is trusted, the client is the connection's peer."""

    def __post_init__(self) -> None:
        if self.shutdown_grace < 0:
            raise ValueError(f"shutdown_grace to be >= 0 (it is {self.shutdown_grace})")
        if self.header_timeout <= 0:
            raise ValueError(f"header_timeout to be > 0 (it is {self.header_timeout})")
        if self.keepalive_timeout <= 0:
            raise ValueError(f"keepalive_timeout to be > 0 (it is {self.keepalive_timeout})")
        if self.max_connections < 1:
            raise ValueError(f"max_connections to be >= 1 (it is {self.max_connections})")
        for pattern in self.allowed_hosts:
            problem = host_pattern_problem(pattern)
            if problem:
                raise ValueError(f"allowed_hosts entries to be {problem}")
        for origin in self.cors_origins:
            problem = origin_problem(origin)
            if problem:
                raise ValueError(f"cors_origins entries to be {problem}")
        if self.forwarded_allow_ips is not None:
            for entry in proxy_entries(self.forwarded_allow_ips):
                if entry != "*" and not is_network(entry):
                    raise ValueError(
                        f"forwarded_allow_ips to be IP addresses or CIDR networks, or * (found {entry!r})"
                    )


def proxy_entries(value: list[str] | str) -> list[str]:
    """``forwarded_allow_ips`` as a list: a string is comma-separated, as uvicorn reads it."""
    return [e.strip() for e in (value.split(",") if isinstance(value, str) else value)]


def is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


class GenerationConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``[generation]``: how replies are persisted while they are produced."""

    flush_interval: float = 0.5
    """Seconds between writes of a growing reply (bounds store writes per reply)."""
    stale_after: float = 30.0
    """A reply not written for this long is considered orphaned by a crash and marked interrupted."""

    def __post_init__(self) -> None:
        if self.flush_interval <= 0:
            raise ValueError(f"flush_interval to be > 0 (it is {self.flush_interval})")
        if self.stale_after < 3 * self.flush_interval:
            raise ValueError("stale_after to be at least 3 times flush_interval")


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``[models.<name>]``: a model clients may ask for, who serves it, and what it costs.

    Prices are credits per million tokens.
    """

    provider: str
    input_price: float = 0.0
    output_price: float = 0.0
    context_tokens: int = 16_384
    max_output_tokens: int = 4_096
    description: str = ""
    vision: bool = False
    """Whether the model takes images: a request with an image part for one that does not is
    refused (400 naming the part), not sent on to fail upstream or lose the image."""
    kind: Literal["chat", "embedding"] = "chat"
    """What the model does: ``chat`` (replies) or ``embedding`` (vectors, ``/v1/embeddings``; its
    ``input_price`` is charged per input token). A request of the other kind is refused (400)."""

    def __post_init__(self) -> None:
        if self.input_price < 0 or self.output_price < 0:
            raise ValueError("input_price and output_price to be >= 0")
        if not 0 < self.max_output_tokens < self.context_tokens:
            raise ValueError("max_output_tokens to be > 0 and below context_tokens")


class PluginTable(msgspec.Struct, frozen=True):
    """A plugin selection: which plugin, whether enabled, its still unvalidated options."""

    path: tuple[str, ...]
    plugin: str
    enabled: bool
    options: dict[str, Any]
    plugin_path: tuple[str, ...]
    """Where the plugin name came from: ``<path>.plugin``, or ``<path>`` when it defaulted."""
    fallbacks: tuple[str, ...] = ()
    """Provider instances tried in order when this one fails before replying (providers only)."""

    @property
    def key(self) -> str:
        return dotted(self.path)


class Config(msgspec.Struct, frozen=True):
    """A loaded ``plugins.toml`` whose core sections are valid."""

    path: str
    server: ServerConfig
    generation: GenerationConfig
    store: PluginTable
    providers: dict[str, PluginTable]
    surfaces: dict[str, PluginTable]
    models: dict[str, ModelConfig]
    web_search: PluginTable | None = None
    """The optional ``[web_search]`` table: which web search plugin, and its options."""
    text: str = ""
    from_env: dict[tuple[str, ...], str] = {}
    """Keys whose value came from ``${VAR}`` substitution, with the text as written."""
    unresolved: frozenset[tuple[str, ...]] = frozenset()
    """Keys whose variable was unset (already reported)."""


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate ``path``; raise :class:`ConfigError` listing every problem."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [Problem(file, "", "a configuration file (pass --config or set CHATGATE_CONFIG)", "no such file")]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(file, "", "a readable UTF-8 file", str(exc))]) from None
    return parse_config(text, file, os.environ if env is None else env)


def parse_config(text: str, file: str, env: Mapping[str, str]) -> Config:
    """Validate configuration ``text`` (named ``file`` in messages)."""
    try:
        raw = msgspec.toml.decode(text)
    except msgspec.DecodeError as exc:
        message = str(exc)
        match = re.search(r"line (\d+)", message)
        line = int(match.group(1)) if match else None
        if line is None and "end of document" in message:
            line = len(text.splitlines()) or 1
        raise ConfigError([Problem(file, "", "valid TOML", message, line)]) from None
    report = Report(file, text)
    raw = substitute_env(raw, env, report, ())
    for key in raw:
        if key not in SECTIONS:
            report.unknown((key,), SECTIONS)

    server = report.convert(raw.get("server", {}), ServerConfig, ("server",))
    generation = report.convert(raw.get("generation", {}), GenerationConfig, ("generation",))
    store = plugin_table(report, raw.get("store"), ("store",), selectable=False)
    providers = plugin_tables(report, raw.get("providers", {}), "providers", selectable=False)
    seen: dict[str, str] = {}
    for name in providers:
        if name.lower() in seen:  # X-AI-Provider picks instances case-insensitively
            report.add(
                ("providers", name),
                f'a name that differs from "{seen[name.lower()]}" in more than case',
                f'"{name}"',
            )
        seen.setdefault(name.lower(), name)
    for name, table in providers.items():
        for position, fallback in enumerate(table.fallbacks):
            if fallback in table.fallbacks[:position]:
                report.add(
                    ("providers", name, "fallbacks", str(position)),
                    "each instance named once",
                    f'"{fallback}" again',
                )
            elif fallback not in providers or fallback == name:
                others = [p for p in providers if p != name]
                report.add(
                    ("providers", name, "fallbacks", str(position)),
                    f"the name of another configured provider ({', '.join(others) or 'none'})",
                    describe_value(fallback),
                )
    surfaces = plugin_tables(report, raw.get("surfaces", {}), "surfaces", selectable=True)
    web_search = plugin_table(report, raw.get("web_search"), ("web_search",), selectable=False)
    models: dict[str, ModelConfig] = {}
    model_tables = raw.get("models", {})
    if report.is_table(model_tables, ("models",)):
        for name, table in model_tables.items():
            model = report.convert(table, ModelConfig, ("models", name))
            if model is None:
                continue
            models[name] = model
            if model.provider not in providers:
                report.add(
                    ("models", name, "provider"),
                    f"one of the configured providers ({', '.join(providers) or 'none'})",
                    describe_value(model.provider),
                )
    if store is None and "store" not in raw:
        report.add(("store",), "a [store] table naming a store plugin", "nothing")
    if store is None:
        report.raise_if_any()  # without a store table there is no partial configuration to offer
    assert store is not None
    config = Config(
        path=file,
        server=server or ServerConfig(),
        generation=generation or GenerationConfig(),
        store=store,
        providers=providers,
        surfaces=surfaces,
        models=models,
        web_search=web_search,
        text=text,
        from_env=report.from_env,
        unresolved=frozenset(report.unresolved),
    )
    report.raise_if_any(partial=config)
    return config


def validate_options(config: Config, table: PluginTable, options_type: type[Any]) -> Any:
    """Convert a plugin's table to its ``Options`` struct; raise :class:`ConfigError` on problems."""
    report = Report(config.path, config.text, config.from_env)
    report.unresolved.update(config.unresolved)
    options = report.convert(table.options, options_type, table.path)
    report.raise_if_any()
    return options


class Report:
    """Collects configuration problems with their key paths and lines."""

    def __init__(self, file: str, text: str, from_env: dict[tuple[str, ...], str] | None = None) -> None:
        self.file = file
        self.text = text
        self.problems: list[Problem] = []
        self.from_env = {} if from_env is None else from_env
        self.unresolved: set[tuple[str, ...]] = set()

    def substituted_under(self, path: tuple[str, ...]) -> bool:
        return any(key[: len(path)] == path for key in self.from_env)

    def found(self, path: tuple[str, ...], value: Any) -> str:
        """How a found value reads; substituted values may be secrets, so they are named, not shown."""
        if path in self.from_env:
            return f"the value of {self.from_env[path]}"
        return describe_value(value)

    def add(self, path: tuple[str, ...], expected: str, found: str) -> None:
        self.problems.append(Problem(self.file, dotted(path), expected, found, locate(self.text, path)))

    def unknown(self, path: tuple[str, ...], known: tuple[str, ...] | list[str]) -> None:
        *_, name = path
        close = difflib.get_close_matches(name, known, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        expected = f"one of the keys {', '.join(known)}" if known else "no keys here"
        self.add(path, expected + hint, f'unknown key "{name}"')

    def is_table(self, value: Any, path: tuple[str, ...]) -> bool:
        if isinstance(value, dict):
            return True
        self.add(path, "a table", describe_value(value))
        return False

    def convert(self, value: Any, struct: type[Any], path: tuple[str, ...]) -> Any:
        """Validate ``value`` against ``struct`` field by field, so every bad key is reported."""
        if not self.is_table(value, path):
            return None
        fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
        before = len(self.problems)
        skipped = False
        for key, item in value.items():
            field = fields.get(key)
            if field is None:
                self.unknown((*path, key), list(fields))
                continue
            if (*path, key) in self.unresolved:
                skipped = True  # its unset variable is the problem, already reported
                continue
            try:
                # Lenient only where ${VAR} produced a string: `port = "8000"` written literally is an error.
                msgspec.convert(item, field.type, strict=not self.substituted_under((*path, key)))
            except msgspec.ValidationError as exc:
                self.validation_error((*path, key), field.type, item, exc)
        for name, field in fields.items():
            required = field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT
            if required and name not in value:
                self.add((*path, name), f"{describe_type(field.type)} (required)", "nothing")
        if len(self.problems) > before or skipped:
            return None
        try:
            return msgspec.convert(value, struct, strict=not self.substituted_under(path))
        except msgspec.ValidationError as exc:  # a __post_init__ check spanning fields
            # Options structs phrase their __post_init__ errors as expectations: "x to be > 0".
            self.add(path, str(exc).split(" - at ")[0].rstrip("."), "values that do not")
            return None

    def validation_error(
        self, path: tuple[str, ...], tp: Any, item: Any, exc: msgspec.ValidationError
    ) -> None:
        message = str(exc)
        inner = re.search(r" - at `\$((?:\.[^`.\[]+|\[[^\]]+\])*)`", message)
        sub = tuple(re.findall(r"\.([^.\[]+)|\[([^\]]+)\]", inner.group(1))) if inner else ()
        subpath = tuple(a or b for a, b in sub)
        target = item
        for part in subpath:
            target = target[int(part)] if isinstance(target, list) else target.get(part)
        unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
        missing = re.match(r"Object missing required field `([^`]+)`", message)
        if unknown:
            self.add((*path, *subpath, unknown.group(1)), "no such key", f'unknown key "{unknown.group(1)}"')
        elif missing:
            self.add((*path, *subpath, missing.group(1)), "a value (required)", "nothing")
        elif subpath:
            self.add((*path, *subpath), msgspec_expectation(message), self.found((*path, *subpath), target))
        else:
            self.add(path, describe_type(tp), self.found(path, item))

    def raise_if_any(self, partial: Config | None = None) -> None:
        if self.problems:
            raise ConfigError(sort_problems(self.problems), partial)


def sort_problems(problems: list[Problem]) -> list[Problem]:
    """Problems in the order of the file's lines (those without a line last)."""
    return sorted(problems, key=lambda p: p.line or 1 << 30)


def plugin_tables(report: Report, value: Any, section: str, *, selectable: bool) -> dict[str, PluginTable]:
    if not report.is_table(value, (section,)):
        return {}
    tables = {}
    for name, table in value.items():
        parsed = plugin_table(report, table, (section, name), selectable=selectable, default_plugin=name)
        if parsed is not None:
            tables[name] = parsed
    return tables


def plugin_table(
    report: Report,
    value: Any,
    path: tuple[str, ...],
    *,
    selectable: bool,
    default_plugin: str | None = None,
) -> PluginTable | None:
    """Split a plugin table into the selection keys (``plugin``, ``enabled``) and its options."""
    if value is None or not report.is_table(value, path):
        return None
    options = dict(value)
    plugin = options.pop("plugin", default_plugin)
    enabled = options.pop("enabled", True) if selectable else True
    fallbacks = options.pop("fallbacks", []) if path[0] == "providers" else []
    if not (isinstance(fallbacks, list) and all(isinstance(f, str) for f in fallbacks)):
        report.add((*path, "fallbacks"), "a list of provider instance names", describe_value(fallbacks))
        return None
    if not isinstance(plugin, str):
        report.add((*path, "plugin"), "the name of an installed plugin (a string)", describe_value(plugin))
        return None
    if not isinstance(enabled, bool):
        report.add((*path, "enabled"), "true or false", describe_value(enabled))
        return None
    plugin_path = (*path, "plugin") if "plugin" in value else path
    return PluginTable(path, plugin, enabled, options, plugin_path, tuple(fallbacks))


def substitute_env(value: Any, env: Mapping[str, str], report: Report, path: tuple[str, ...]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of the tree."""
    if isinstance(value, dict):
        return {k: substitute_env(v, env, report, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, env, report, (*path, str(i))) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        report.add(path, f"environment variable {name} to be set", "it unset")
        report.unresolved.add(path)
        return ""

    report.from_env[path] = value
    return ENV_VAR.sub(replace, value)


def dotted(path: tuple[str, ...]) -> str:
    return ".".join(f'"{p}"' if not re.fullmatch(r"[A-Za-z0-9_-]+", p) else p for p in path)


def locate(text: str, path: tuple[str, ...]) -> int | None:
    """The line that defines ``path`` in the TOML ``text``, best effort (headers and bare keys)."""
    if not text or not path:
        return None
    lines = text.splitlines()
    for split in range(len(path), 0, -1):
        header, keys = path[:split], path[split:]
        header_re = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(map(key_pattern, header)) + r"\s*\]\s*(#.*)?$")
        for number, line in enumerate(lines, 1):
            if not header_re.match(line):
                continue
            if not keys:
                return number
            key_re = re.compile(r"^\s*" + r"\s*\.\s*".join(map(key_pattern, keys[:1])) + r"\s*=")
            for offset, body in enumerate(lines[number:], number + 1):
                if body.lstrip().startswith("["):
                    break
                if key_re.match(body):
                    return offset
            return number
    key_re = re.compile(r"^\s*" + key_pattern(path[0]) + r"\s*=")
    return next((n for n, line in enumerate(lines, 1) if key_re.match(line)), None)


def key_pattern(key: str) -> str:
    return "(?:" + re.escape(key) + '|"' + re.escape(key) + "\"|'" + re.escape(key) + "')"


def msgspec_expectation(message: str) -> str:
    """msgspec's "Expected `int`, got `str` - at ..." as "an integer"."""
    match = re.match(r"Expected `([^`]+)`", message)
    if not match:
        return message.split(" - at ")[0]
    names = {"int": "an integer", "str": "a string", "float": "a number", "bool": "true or false"}
    names |= {"array": "a list", "object": "a table", "null": "nothing"}
    return " or ".join(names.get(part.strip(), part.strip()) for part in match.group(1).split("|"))


def describe_value(value: Any) -> str:
    """How a TOML value reads in an error message: ``"thirty" (a string)``."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f'"{value}" (a string)'
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value} (a number)"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def describe_type(tp: Any) -> str:
    """How a field's type reads in an error message: ``a number``, ``one of "a", "b"``."""
    origin = get_origin(tp)
    if tp is Any:
        return "any value"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        options = [describe_type(a) for a in get_args(tp) if a is not type(None)]
        return " or ".join(options)
    if origin in (list, tuple, set, frozenset):
        args = get_args(tp)
        return f"a list of {plural(describe_type(args[0]))}" if args else "a list"
    if origin is dict or tp is dict:
        return "a table"
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return "a table"
    return getattr(tp, "__name__", str(tp))


def plural(description: str) -> str:
    for article in ("an ", "a "):
        if description.startswith(article):
            return description[len(article) :] + "s"
    return description
