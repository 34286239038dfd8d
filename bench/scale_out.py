"""Scale-out on one machine: chatgate on SQLite, on PostgreSQL, and three instances behind nginx.

Run: ``python bench/scale_out.py [--quick]`` (about 2 minutes; ``--quick`` about 1).

Needs the local PostgreSQL (``CHATGATE_BENCH_POSTGRES``, an admin DSN; default
postgres@127.0.0.1:5432) and Debian's nginx. It creates throwaway databases
``chatgate_bench_<pid>_<setup>``, one per setup so that each setup's PostgreSQL backends
are its own, and drops them at the end. Every chatgate runs one worker, an API key with
generous limits, billing on, in front of the same fake DeepSeek server
(core/testing/fake_upstream.py, 24-token replies) that bench/openai_overhead.py uses.
Setups, all running at once:

- ``sqlite``: one ``chatgate serve`` on a SQLite file;
- ``postgres``: one on PostgreSQL;
- ``3 x pg + nginx``: three on one PostgreSQL database behind nginx, with the upstream and
  server blocks of docs/deploy.md (the ones tests/test_nginx.py runs; ``least_conn``, which
  takes the instances in turn when they are equally busy), one nginx worker, access log off.

It measures:

1. ``/v1/chat/completions``, whole and streamed, at concurrency 16 and 64 through each setup,
   the setups taking turns in each cell, five passes over all cells (bench/openai_overhead.py's
   load generator, uncounted warm-up first): requests/s over the passes (and each pass's
   ratio), p50/p99, and CPU per request from /proc (user + system) of the chatgate processes,
   of nginx (master and worker) and of the PostgreSQL backends of the setup's database, each
   separately;
2. paced streams (20 tokens 20 ms apart) at 256 and 1,024 at once through the SQLite and the
   PostgreSQL instance (bench/long_streams.py's measurement), with the same CPU figures;
3. store statements per request on PostgreSQL for a steady key: one request after another,
   16 at once (whole and streamed) and 256 paced streams at once. A fresh instance runs on
   a database with ``log_statement = 'all'``, and the statements the server logs for that
   database are counted (one per simple query or extended-protocol execute: BEGIN and
   COMMIT count, and each row of a batched insert), minus what the idle instance logs in
   the same time. SQLite's statements run inside the server process with no outside
   trace, so they are not counted;
4. cross-instance interrupt latency: an ``/api/chat`` streaming on instance A (a token every
   10 ms, a long reply), then a newer ``/api/chat`` for the same email on instance B; from
   sending B's request to the fake upstream (in this process, one clock) seeing A's upstream
   connection closed. Two instances on PostgreSQL, then two processes on one SQLite file
   (targets: p99 under 100 ms and under 250 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from email_socket import CONFIG as EMAIL_CONFIG
from email_socket import interrupts
from long_streams import TOKEN_DELAY, TOKENS, PeakRss, streams
from openai_overhead import (
    BODY,
    ROOT,
    UPSTREAM_KEY,
    Run,
    Target,
    cpu_seconds,
    create_key,
    free_port,
    load,
    percentile,
    spawn,
    wait_for,
    wait_healthy,
)
from openai_overhead import CONFIG as OVERHEAD_CONFIG

from core.testing.fake_upstream import FakeUpstream  # email_socket put the repository on sys.path

ADMIN_DSN = os.environ.get("CHATGATE_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
DEPLOY = ROOT / "docs" / "deploy.md"
PATH = "/v1/chat/completions"
CONCURRENCY = (16, 64)
PACED_CONCURRENCY = (256, 1024)
SQLITE_STORE = 'plugin = "sqlite"\npath = "{db}"\n'

# openai_overhead's chatgate (generous key limits, billing on), with room for 1,024 paced streams,
# and a second provider on the paced fake: model "paced-chat" streams 20 tokens 20 ms apart.
CONFIG = (
    OVERHEAD_CONFIG.replace("workers = 1\n", "workers = 1\nmax_connections = 4096\n").replace(
        "concurrent_requests = 1000", "concurrent_requests = 4096"
    )
    + """
[providers.paced]
plugin = "deepseek"
base_url = "{paced}"
api_key = "{key}"

[providers.paced.aliases]
paced-chat = {{ model = "deepseek-v4-flash", extra_body = {{ thinking = {{ type = "disabled" }} }} }}

[models.paced-chat]
provider = "paced"
input_price = 0.3
output_price = 1.2
"""
)
assert "max_connections = 4096" in CONFIG
assert "concurrent_requests = 4096" in CONFIG
PACED_BODY: dict[str, object] = {**BODY, "model": "paced-chat"}
# docs/deploy.md's [server] lines that matter behind a proxy on this host.
BEHIND_NGINX = 'workers = 1\nforwarded_allow_ips = ["127.0.0.1"]\nkeepalive_timeout = 75\n'


def on_postgres(config: str, dsn: str, schema: str) -> str:
    """``config`` (a bench template) with its SQLite store replaced by ``schema`` of PostgreSQL at ``dsn``."""
    assert SQLITE_STORE in config, "the benchmarks' [store] section changed"
    return config.replace(SQLITE_STORE, f'plugin = "postgres"\ndsn = "{dsn}"\nschema = "{schema}"\n')


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (nginx's workers), from /proc."""
    total = cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(OSError):  # it ended meanwhile
            total += cpu_seconds(int(child))
    return total


class Backends:
    """The PostgreSQL server processes serving one database (its connections' backends)."""

    def __init__(self, admin: asyncpg.Connection, database: str) -> None:
        self.admin, self.database = admin, database

    async def cpu(self) -> dict[int, float]:
        """CPU seconds so far of each backend now connected to the database, from /proc."""
        rows = await self.admin.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", self.database)
        seconds = {}
        for row in rows:
            with contextlib.suppress(OSError):  # it ended meanwhile
                seconds[row["pid"]] = cpu_seconds(row["pid"])
        return seconds


@dataclass
class Spent:
    """CPU milliseconds per request of a setup's chatgate processes, its nginx and its database's backends."""

    server: float
    proxy: float | None
    database: float | None


@dataclass
class Setup:
    """One deployment under measurement: its chatgate processes, nginx when proxied, where clients call."""

    name: str
    url: str
    servers: list[subprocess.Popen[bytes]]
    headers: dict[str, str] = field(default_factory=dict)
    proxy: subprocess.Popen[bytes] | None = None
    backends: Backends | None = None

    async def metered(self, work: Awaitable[Run], requests: int) -> tuple[Run, Spent]:
        """Run ``work`` (which sends ``requests``) and the CPU it cost per request (from /proc)."""
        database = await self.backends.cpu() if self.backends else {}
        server = sum(tree_cpu(p.pid) for p in self.servers)
        proxy = tree_cpu(self.proxy.pid) if self.proxy else 0.0
        run = await work
        server = sum(tree_cpu(p.pid) for p in self.servers) - server
        proxy = tree_cpu(self.proxy.pid) - proxy if self.proxy else 0.0
        # A backend that connected meanwhile counts whole; one that left is lost (pools keep theirs).
        after = await self.backends.cpu() if self.backends else {}
        spent_db = sum(seconds - database.get(pid, 0.0) for pid, seconds in after.items())
        per = 1000 / requests
        return run, Spent(
            server * per, proxy * per if self.proxy else None, spent_db * per if self.backends else None
        )


@dataclass
class Cell:
    """One (setup, mode, concurrency) measurement."""

    setup: str
    stream: bool
    concurrency: int
    run: Run
    spent: Spent
    turn: int = 0
    passes: list[float] = field(default_factory=list)


class Processes:
    """Every child process this run started, so that a failure still stops them all."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def serve(self, config: Path, ports: list[int]) -> list[subprocess.Popen[bytes]]:
        """One ``chatgate serve`` per port on ``config``, started together."""
        env = {**os.environ, "CHATGATE_CONFIG": str(config)}
        started = [spawn("-m", "core.cli", "serve", "--port", str(port), env=env) for port in ports]
        self.started += started
        return started

    def add(self, process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.started.append(process)
        return process

    def stop(self, processes: list[subprocess.Popen[bytes]], sig: int = signal.SIGTERM) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(sig)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_all(self) -> None:
        self.stop(self.started)


async def start_setup(
    processes: Processes, name: str, config: Path, ports: list[int], url: str | None = None
) -> Setup:
    """chatgate on ``ports``, healthy, with a funded key (made once the store has its tables)."""
    servers = processes.serve(config, ports)
    for port in ports:
        await wait_healthy(f"http://127.0.0.1:{port}")
    key = create_key({**os.environ, "CHATGATE_CONFIG": str(config)})
    return Setup(name, url or f"http://127.0.0.1:{ports[0]}", servers, {"Authorization": f"Bearer {key}"})


# -- nginx ------------------------------------------------------------------------------------------


def nginx_binary() -> str:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise SystemExit("nginx is needed for the proxied setup: apt-get install -y nginx")
    return found


def nginx_config(directory: Path, instances: list[int], port: int) -> str:
    """nginx.conf with docs/deploy.md's upstream and server blocks, on loopback ports."""
    blocks = re.findall(r"^```nginx\n(.*?)^```", DEPLOY.read_text(), re.S | re.M)
    [site] = [b for b in blocks if "upstream chatgate {" in b]
    servers = re.findall(r"server 10\.0\.0\.\d+:8000", site)
    assert len(servers) == len(instances), "docs/deploy.md's upstream has another number of instances"
    for old, instance in zip(servers, instances, strict=True):
        site = site.replace(old, f"server 127.0.0.1:{instance}", 1)
    assert "listen 80;" in site, "docs/deploy.md's server block changed"
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    # Run as root, nginx's workers would be nobody, who cannot enter this run's 0700 directory.
    user = "user root;" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {directory}/{kind};" for kind in ("proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
{user}
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {directory}/client_body;
{temp}
{site}
}}
"""


def start_nginx(
    processes: Processes, directory: Path, instances: list[int], port: int
) -> subprocess.Popen[bytes]:
    conf = directory / "nginx.conf"
    conf.write_text(nginx_config(directory, instances, port))
    command = ["-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log"), "-g", "daemon off;"]
    return processes.add(spawn(*command, program=nginx_binary()))


# -- measurements ---------------------------------------------------------------------------------


async def throughput(setups: list[Setup], requests: int, warmup: int, passes: int) -> list[Cell]:
    """Whole and streamed completions at each concurrency, with CPU per request. The setups take
    turns in each cell, and every cell is measured ``passes`` times, so that the machine's
    speed, which drifts from minute to minute on a shared VM, touches the setups alike."""
    cells = []
    for turn in range(passes):
        for stream in (False, True):
            for concurrency in CONCURRENCY:
                body = {**BODY, "stream": stream}
                for setup in setups:
                    work = load(setup.url, PATH, setup.headers, body, concurrency, requests, warmup=warmup)
                    run, spent = await setup.metered(work, requests + warmup)  # the CPU counts the warm-up
                    cells.append(Cell(setup.name, stream, concurrency, run, spent, turn))
    return merged(cells)


def merged(cells: list[Cell]) -> list[Cell]:
    """One cell per (setup, mode, concurrency) from its passes: all their requests, their CPU's mean;
    ``passes`` keeps each pass's requests/s."""
    groups: dict[tuple[str, bool, int], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.setup, cell.stream, cell.concurrency), []).append(cell)
    out = []
    for (setup, stream, concurrency), group in groups.items():
        runs = [c.run for c in group]
        run = Run(
            latencies=[x for r in runs for x in r.latencies],
            first_tokens=[x for r in runs for x in r.first_tokens],
            wall=sum(r.wall for r in runs),
            errors=sum(r.errors for r in runs),
        )

        def mean(values: list[float | None]) -> float | None:
            return None if values[0] is None else sum(v or 0.0 for v in values) / len(values)

        spent = Spent(
            sum(c.spent.server for c in group) / len(group),
            mean([c.spent.proxy for c in group]),
            mean([c.spent.database for c in group]),
        )
        out.append(Cell(setup, stream, concurrency, run, spent, passes=[r.rps() for r in runs]))
    return out


@dataclass
class Paced:
    setup: str
    concurrency: int
    run: Run
    peak_rss: float
    spent: Spent


async def paced(setups: list[Setup], rounds: int) -> list[Paced]:
    """bench/long_streams.py's streams through each setup's (first) instance, taking turns."""
    rows = []
    for concurrency in PACED_CONCURRENCY:
        for setup in setups:
            target = Target(setup.name, setup.url, PATH, setup.headers, PACED_BODY, setup.servers[0])
            with PeakRss(setup.servers[0].pid) as rss:
                work = streams(target, concurrency, rounds)
                run, spent = await setup.metered(work, concurrency * (rounds + 1))
            rows.append(Paced(setup.name, concurrency, run, rss.peak, spent))
            await asyncio.sleep(1)  # let the last streams' connections close
    return rows


class StatementLog:
    """The statements PostgreSQL logs for one database, counted in its server log.

    Needs the log readable here (this user can read the server's stderr file, or
    ``logging_collector``'s current file) and ``%d`` in ``log_line_prefix``.
    """

    def __init__(self, path: Path, database: str) -> None:
        self.path = path
        # "... [pid] user@db LOG:  statement: SELECT 1" (simple query) or "... LOG:  execute name: ..."
        self.statement = re.compile(rf"@{re.escape(database)} LOG:  (?:statement|execute [^:]*): (.*)")

    @classmethod
    async def find(cls, admin: asyncpg.Connection, database: str) -> StatementLog | str:
        """The log, or why statements cannot be counted here."""
        prefix = await admin.fetchval("SHOW log_line_prefix")
        if "%d" not in prefix:
            return f"log_line_prefix ({prefix!r}) does not name the database"
        current = await admin.fetchval("SELECT pg_current_logfile()")
        if current:
            path = Path(current)
            if not path.is_absolute():
                path = Path(await admin.fetchval("SHOW data_directory")) / path
        else:  # no collector: the server's stderr, which every backend shares
            pid = await admin.fetchval("SELECT pg_backend_pid()")
            try:
                path = Path(os.readlink(f"/proc/{pid}/fd/2"))
            except OSError as exc:
                return f"the server's log is not reachable from here ({exc})"
        if not path.is_file() or not os.access(path, os.R_OK):
            return f"the server's log {path} is not a readable file"
        return cls(path, database)

    def mark(self) -> int:
        return self.path.stat().st_size

    def count(self, since: int) -> Counter[str]:
        """Statements logged for the database since ``mark()`` returned ``since``, by their
        first line's first 70 characters."""
        with open(self.path, "rb") as log:
            log.seek(since)
            text = log.read().decode("utf-8", "replace")
        return Counter(" ".join(m.group(1).split())[:70] for m in self.statement.finditer(text))


@dataclass
class Statements:
    """Statements per request in one phase, net of the idle rate; ``top`` the commonest, gross."""

    phase: str
    requests: int
    statements: float
    commits: float
    top: list[tuple[str, float]]


def commits(counted: Counter[str]) -> int:
    return sum(n for text, n in counted.items() if text.rstrip(";").upper() == "COMMIT")


async def count_statements(
    log: StatementLog, setup: Setup, requests: int, idle_seconds: float
) -> tuple[float, list[Statements]]:
    """Statements per request for a steady key, net of what an idle instance logs in the same time."""
    settle = 0.3  # the last charges are posted up to 50 ms after the reply; leave room
    mark = log.mark()
    await asyncio.sleep(idle_seconds)
    idle = log.count(mark)
    idle_rate, idle_commit_rate = idle.total() / idle_seconds, commits(idle) / idle_seconds

    def completions(concurrency: int, stream: bool, total: int) -> Awaitable[Run]:
        body = {**BODY, "stream": stream}
        return load(setup.url, PATH, setup.headers, body, concurrency, total)

    paced_target = Target(setup.name, setup.url, PATH, setup.headers, PACED_BODY)
    phases: list[tuple[str, Callable[[], Awaitable[Run]], int]] = [
        ("one after another", lambda: completions(1, False, requests), requests),
        ("16 at once", lambda: completions(16, False, requests), requests),
        ("16 at once, streamed", lambda: completions(16, True, requests), requests),
        # long_streams' load: one uncounted round, then one measured; the log sees both.
        ("256 paced streams at once", lambda: streams(paced_target, 256, 1), 512),
    ]
    rows = []
    for phase, work, sent in phases:
        await work()  # the same load once before, uncounted: the key's leases and the pool settle
        await asyncio.sleep(settle)
        mark, started = log.mark(), time.perf_counter()
        run = await work()
        if run.errors:
            raise RuntimeError(f"{run.errors} errors while counting statements")
        await asyncio.sleep(settle)
        elapsed = time.perf_counter() - started
        counted = log.count(mark)
        net = (counted.total() - idle_rate * elapsed) / sent
        net_commits = (commits(counted) - idle_commit_rate * elapsed) / sent
        top = [(text, n / sent) for text, n in counted.most_common(6)]
        rows.append(Statements(phase, sent, net, net_commits, top))
    return idle_rate, rows


async def interrupt_pair(
    processes: Processes, tmp: Path, config: str, trials: int, warmup: int
) -> list[float]:
    """Interrupt latency from instance B to a reply streaming on instance A, on one store."""
    async with FakeUpstream(api_key=UPSTREAM_KEY) as fake:
        ports = [free_port(), free_port()]
        path = tmp / "interrupts.toml"
        path.write_text(
            config.format(port=ports[0], db=tmp / "interrupts.db", upstream=fake.url, key=UPSTREAM_KEY)
        )
        servers = processes.serve(path, ports)
        try:
            a, b = (f"http://127.0.0.1:{port}" for port in ports)
            for url in (a, b):
                await wait_healthy(url)
            pace = {"token_delay": 0.01, "streaming": 0.1}
            await interrupts(fake, a, warmup, newer_url=b, **pace)
            return await interrupts(fake, a, trials, newer_url=b, **pace)
        finally:
            processes.stop(servers)


# -- the report -----------------------------------------------------------------------------------


def cpu_cells(spent: Spent, proxy: bool = True) -> str:
    cells = [spent.server, *([spent.proxy] if proxy else []), spent.database]
    return " | ".join("-" if ms is None else f"{ms:.2f}" for ms in cells)


def report(
    cells: list[Cell],
    paced_rows: list[Paced],
    statements: tuple[float, list[Statements]] | str,
    interrupt_runs: dict[str, list[float]],
    args: argparse.Namespace,
) -> None:
    print(
        f"\n/v1/chat/completions, {args.passes} pass(es) of {args.requests} requests per cell, each after "
        f"{args.warmup} uncounted; "
        "CPU per request from /proc (user + system; PostgreSQL: the backends of the setup's database), "
        "warm-up included"
    )
    print(
        "| setup | mode | conc | req/s | p50 ms | p99 ms "
        "| CPU ms/req: chatgate | nginx | PostgreSQL | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        print(
            f"| {c.setup} | {'stream' if c.stream else 'whole'} | {c.concurrency} | {c.run.rps():,.0f} "
            f"| {percentile(c.run.latencies, 0.5):.2f} | {percentile(c.run.latencies, 0.99):.2f} "
            f"| {cpu_cells(c.spent)} | {c.run.errors} |"
        )

    print(
        f"\nPaced streams ({TOKENS} tokens {TOKEN_DELAY * 1000:.0f} ms apart), one instance, "
        f"{args.rounds} measured streams per caller after one uncounted"
    )
    print(
        "| store | streams at once | streams/s | p50 s | p99 s | TTFT p50 ms | errors | peak RSS MB "
        "| CPU ms/stream: chatgate | PostgreSQL |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in paced_rows:
        print(
            f"| {p.setup} | {p.concurrency:,} | {p.run.rps():,.0f} "
            f"| {percentile(p.run.latencies, 0.5) / 1000:.2f} "
            f"| {percentile(p.run.latencies, 0.99) / 1000:.2f} "
            f"| {percentile(p.run.first_tokens, 0.5):.0f} "
            f"| {p.run.errors} | {p.peak_rss:.0f} | {cpu_cells(p.spent, proxy=False)} |"
        )

    print(
        "\nStore statements per request on PostgreSQL (steady key, whole replies unless said; "
        "statements logged for the instance's database, minus an idle instance's rate)"
    )
    if isinstance(statements, str):
        print(f"not counted: {statements}")
    else:
        idle_rate, rows = statements
        print(f"idle instance: {idle_rate:.1f} statements/s")
        print("| requests | count | statements/req | COMMITs/req |")
        print("|---|---|---|---|")
        for s in rows:
            print(f"| {s.phase} | {s.requests} | {s.statements:.3f} | {s.commits:.3f} |")
        for s in rows:
            commonest = "; ".join(f"{n:.2f}x {text}" for text, n in s.top)
            print(f"- {s.phase}, commonest per request (gross): {commonest}")
    print("SQLite: not counted (its statements run inside the server process, with no outside trace)")

    print("\nCross-instance interrupts: newer /api/chat sent to B -> A's upstream connection closed")
    print("| store | trials | p50 ms | p99 ms | max ms | target p99 |")
    print("|---|---|---|---|---|---|")
    targets = {"postgres, 2 instances": 100.0, "sqlite, 2 processes": 250.0}
    for name, latencies in interrupt_runs.items():
        print(
            f"| {name} | {len(latencies)} | {percentile(latencies, 0.5):.2f} "
            f"| {percentile(latencies, 0.99):.2f} | {max(latencies) * 1000:.2f} | < {targets[name]:.0f} ms |"
        )

    cell = {(c.setup, c.stream, c.concurrency): c for c in cells}

    def ratio(ours: str, theirs: str, stream: bool, concurrency: int) -> tuple[float, str]:
        """``ours`` / ``theirs`` in requests/s over all passes, and each pass's ratio."""
        a, b = cell[ours, stream, concurrency], cell[theirs, stream, concurrency]
        each = ", ".join(f"{x / y:.2f}" for x, y in zip(a.passes, b.passes, strict=True))
        return a.run.rps() / b.run.rps(), f" (passes: {each})" if len(a.passes) > 1 else ""

    print("\nRatios (issue 18's targets; requests/s over all passes):")
    for stream in (False, True):
        mode = "stream" if stream else "whole"
        value, each = ratio("postgres", "sqlite", stream, 16)
        met = "met" if value >= 0.85 else "NOT met"
        print(
            f"- PostgreSQL instance vs SQLite instance, {mode} at 16: {value:.0%}{each} "
            f"(target >= 85%): {met}"
        )
    for stream in (False, True):
        for concurrency in CONCURRENCY:
            mode = "stream" if stream else "whole"
            value, each = ratio("3 x pg + nginx", "postgres", stream, concurrency)
            print(
                f"- three instances behind nginx vs one PostgreSQL instance, {mode} at {concurrency}: "
                f"{value:.2f}x{each}"
            )
    if not isinstance(statements, str):
        for s in statements[1]:
            print(f"- statements per request, {s.phase}: {s.statements:.3f}")
    for name, latencies in interrupt_runs.items():
        p99 = percentile(latencies, 0.99)
        print(
            f"- interrupt p99, {name}: {p99:.1f} ms (target < {targets[name]:.0f} ms): "
            f"{'met' if p99 < targets[name] else 'NOT met'}"
        )


class Databases:
    """Throwaway databases on the PostgreSQL server, one per setup (so that each setup's backends
    are its own to measure), dropped at the end."""

    def __init__(self, admin: asyncpg.Connection) -> None:
        self.admin = admin
        self.created: list[str] = []

    async def create(self, name: str) -> tuple[str, str]:
        """A new database's name and DSN."""
        database = f"chatgate_bench_{os.getpid()}_{name}"
        await self.admin.execute(f'CREATE DATABASE "{database}"')
        self.created.append(database)
        return database, f"{ADMIN_DSN.rpartition('/')[0]}/{database}"

    async def drop_all(self) -> None:
        for database in self.created:
            await self.admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and trials (about a minute)")
    parser.add_argument("--requests", type=int, help="requests per cell and pass (default 1000, quick 500)")
    parser.add_argument("--passes", type=int, help="passes over the throughput cells (default 5, quick 1)")
    parser.add_argument("--trials", type=int, help="interrupt trials per store (default 50, quick 20)")
    args = parser.parse_args()
    args.requests = args.requests or (500 if args.quick else 1000)
    args.passes = args.passes or (1 if args.quick else 5)
    args.trials = args.trials or (20 if args.quick else 50)
    args.warmup = 100 if args.quick else 200
    args.rounds = 1 if args.quick else 3

    tmp = Path(tempfile.mkdtemp(prefix="chatgate-scale-"))
    admin = await asyncpg.connect(ADMIN_DSN, timeout=5)
    databases = Databases(admin)
    processes = Processes()
    try:
        fast_port, paced_port = free_port(), free_port()
        fast, paced_url = f"http://127.0.0.1:{fast_port}", f"http://127.0.0.1:{paced_port}"
        for port, tokens, delay in ((fast_port, 24, 0.0), (paced_port, TOKENS, TOKEN_DELAY)):
            options = ["--port", str(port), "--api-key", UPSTREAM_KEY, "--tokens", str(tokens)]
            options += ["--token-delay", str(delay), "--history", "100"]
            processes.add(spawn("-m", "core.testing.fake_upstream", *options))
        for url in (fast, paced_url):
            upstream_body = {**BODY, "model": "deepseek-v4-flash"}
            await wait_for(
                url, "/chat/completions", {"Authorization": f"Bearer {UPSTREAM_KEY}"}, upstream_body
            )

        def write(name: str, template: str) -> Path:
            path = tmp / f"{name}.toml"
            text = template.format(
                port=8000, db=tmp / f"{name}.db", upstream=fast, paced=paced_url, key=UPSTREAM_KEY
            )
            path.write_text(text)
            return path

        print(
            "starting: one instance on SQLite, one on PostgreSQL, three on PostgreSQL behind nginx",
            flush=True,
        )
        lite = await start_setup(processes, "sqlite", write("sqlite", CONFIG), [free_port()])
        single_db, dsn = await databases.create("single")
        single = await start_setup(
            processes, "postgres", write("single", on_postgres(CONFIG, dsn, "bench")), [free_port()]
        )
        single.backends = Backends(admin, single_db)
        trio_db, dsn = await databases.create("trio")
        trio_config = on_postgres(CONFIG, dsn, "bench").replace("workers = 1\n", BEHIND_NGINX)
        ports, edge = [free_port() for _ in range(3)], free_port()
        trio = await start_setup(
            processes, "3 x pg + nginx", write("trio", trio_config), ports, f"http://127.0.0.1:{edge}"
        )
        trio.proxy, trio.backends = start_nginx(processes, tmp, ports, edge), Backends(admin, trio_db)
        await wait_healthy(trio.url, 10)
        for setup in (lite, single, trio):
            await wait_for(setup.url, PATH, setup.headers, BODY)

        print("completions ...", flush=True)
        cells = await throughput([lite, single, trio], args.requests, args.warmup, args.passes)
        processes.stop([trio.proxy], signal.SIGQUIT)  # graceful
        processes.stop(trio.servers)
        print("paced streams ...", flush=True)
        paced_rows = await paced([lite, single], args.rounds)
        processes.stop(lite.servers + single.servers)

        print("statements per request on PostgreSQL ...", flush=True)
        statements: tuple[float, list[Statements]] | str
        counted_db, dsn = await databases.create("counted")
        log = await StatementLog.find(admin, counted_db)
        if isinstance(log, str):
            statements = log
        else:
            # Sessions take it when they connect: this database's, all of them the instance's.
            await admin.execute(f"ALTER DATABASE \"{counted_db}\" SET log_statement = 'all'")
            counted = await start_setup(
                processes, "postgres", write("counted", on_postgres(CONFIG, dsn, "bench")), [free_port()]
            )
            await wait_for(counted.url, PATH, counted.headers, BODY)
            statements = await count_statements(log, counted, 2 * args.requests, 1.0 if args.quick else 2.0)
            processes.stop(counted.servers)

        interrupt_runs = {}
        _, dsn = await databases.create("interrupts")
        warm = 3 if args.quick else 10
        for name, template in (
            ("postgres, 2 instances", on_postgres(EMAIL_CONFIG, dsn, "bench")),
            ("sqlite, 2 processes", EMAIL_CONFIG),
        ):
            print(f"interrupts: {name} ...", flush=True)
            interrupt_runs[name] = await interrupt_pair(processes, tmp, template, args.trials, warm)
    finally:
        processes.stop_all()
        await databases.drop_all()
        await admin.close()
        shutil.rmtree(tmp, ignore_errors=True)

    report(cells, paced_rows, statements, interrupt_runs, args)


if __name__ == "__main__":
    started = time.perf_counter()
    asyncio.run(main())
    print(f"\n({time.perf_counter() - started:.0f} s)")
