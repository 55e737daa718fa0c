"""The real servers the tests talk to: skipped only where a server does not answer (a
failure in CI, where .ci/run starts them); the test database is created when missing."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
import redis.backoff
import redis.retry
import sqlalchemy

PASSWORD = "s3cret-pw"  # trust auth ignores it; it must never be printed
# Two checkouts may run their suites side by side on one machine, each with its own database;
# under pytest-xdist each worker (gw0, gw1, ...) takes its own database, Redis db and ports.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
WORKER_INDEX = int(WORKER.removeprefix("gw") or 0)
DATABASE = os.environ.get("HPO_TEST_DATABASE", "hpo_test") + (f"_{WORKER}" if WORKER else "")
# Redis has 16 dbs: worker i takes the base minus i, round the 16 (study names are unique, so
# a db two checkouts share is no conflict, only less tidy).
REDIS_DB = (int(os.environ.get("HPO_TEST_REDIS_DB", "15")) - WORKER_INDEX) % 16
SERVERS = {
    "postgresql": f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:5432/{DATABASE}",
    "mysql": f"mysql+pymysql://root@127.0.0.1:3306/{DATABASE}",
    "redis": f"redis://127.0.0.1:6379/{REDIS_DB}",
}
NO_RETRY = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
# The database each server has before ours exists, to connect to while creating it.
ADMIN_DATABASE = {"postgresql": "postgres", "mysql": ""}
# Where the suite runs in CI (.ci/run sets it): a missing server is a failure there.
IN_CI = os.environ.get("CI") == "true"


def server_url(kind: str) -> str:
    """The server's URL, its test database created if needed; a skip when it does not answer."""
    url = SERVERS[kind]
    try:
        _ping(kind, url)
    except (redis.ConnectionError, sqlalchemy.exc.OperationalError) as err:
        if IN_CI:
            pytest.fail(f"{kind} must be running in CI: {type(err).__name__}: {err}")
        pytest.skip(f"no {kind} server at {url.split('@')[-1]}")
    if kind != "redis":
        _create_database(kind, url)
    return url


def _ping(kind: str, url: str) -> None:
    if kind == "redis":
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        return
    admin = sqlalchemy.engine.make_url(url).set(database=ADMIN_DATABASE[kind])
    with sqlalchemy.create_engine(admin, connect_args={"connect_timeout": 2}).connect():
        pass


def _create_database(kind: str, url: str) -> None:
    admin = sqlalchemy.engine.make_url(url).set(database=ADMIN_DATABASE[kind])
    # CREATE DATABASE cannot run inside a transaction on PostgreSQL.
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        if kind == "mysql":
            connection.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
            return
        exists = connection.exec_driver_sql(
            f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
        ).scalar()
        if not exists:
            connection.exec_driver_sql(f"CREATE DATABASE {DATABASE}")
    engine.dispose()


class OwnServer:
    """A server of the test's own on a free port, which the test may stop and start again.

    Never the shared servers above: stopping those would break every other test running.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()

    def wait_until_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_up():
            if time.monotonic() > deadline:
                raise AssertionError(f"{type(self).__name__} did not start on port {self.port}")
            time.sleep(0.1)

    def is_up(self) -> bool:
        raise NotImplementedError


class OwnPostgres(OwnServer):
    """initdb in a temporary folder; as root, run as the `postgres` user (it refuses root).
    `settings` are server settings for each start (max_connections=5, hot_standby=off)."""

    def __init__(self, folder: Path, **settings: object):
        super().__init__(folder)
        self.settings = settings
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            _missing("PostgreSQL binaries (initdb) in /usr/lib/postgresql/*/bin")
        self.bin = Path(found[-1]).parent
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        self._run("initdb", "-D", str(folder / "data"), "-A", "trust", "-U", "postgres",
                  "--no-sync")  # fmt: skip
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "log"),
                  "-o", options, "-w", "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")

    def is_up(self) -> bool:
        return _connects(self.url)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120, cwd=self.folder)


class OwnMariaDB(OwnServer):
    """mariadb-install-db in a temporary folder, mariadbd on a free port; as root, run as the
    `mysql` user. Grant tables are skipped: the test's own server needs no accounts."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        install, self.server = shutil.which("mariadb-install-db"), _mariadbd()
        if install is None or self.server is None:
            _missing("MariaDB (mariadb-install-db and mariadbd)")
        self.user = ["--user=mysql"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(folder, "mysql", "mysql")
        subprocess.run(
            [install, "--no-defaults", f"--datadir={folder / 'data'}", "--skip-test-db",
             "--auth-root-authentication-method=normal", *self.user],
            check=True, capture_output=True, timeout=120, cwd=folder,
        )  # fmt: skip
        self.url = f"mysql+pymysql://root@127.0.0.1:{self.port}/{DATABASE}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.server, "--no-defaults", f"--datadir={self.folder / 'data'}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--skip-grant-tables",
             f"--socket={self.folder / 'sock'}", f"--pid-file={self.folder / 'pid'}",
             f"--log-error={self.folder / 'log'}", "--skip-log-bin", *self.user],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.wait_until_up()
        _create_database("mysql", self.url)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # SIGTERM: a clean shutdown
            self.process.wait(timeout=60)
            self.process = None

    def is_up(self) -> bool:
        try:
            _ping("mysql", self.url)
        except Exception:
            return False
        return True


class OwnPgBouncer(OwnServer):
    """Debian's pgbouncer on a free port in front of an own PostgreSQL, in transaction mode
    by default: a server connection is lent to a client for one transaction. As root, run
    as the `postgres` user (it refuses root). Its admin console answers `show(...)`."""

    PROGRAM = "/usr/sbin/pgbouncer"

    def __init__(self, folder: Path, postgres: OwnPostgres, **settings: object):
        folder.mkdir(exist_ok=True)
        super().__init__(folder)
        if not Path(self.PROGRAM).exists():
            _missing(f"pgbouncer ({self.PROGRAM})")
        (folder / "users.txt").write_text('"postgres" ""\n')
        config = {
            "listen_addr": "127.0.0.1", "listen_port": self.port, "unix_socket_dir": "",
            "auth_type": "trust", "auth_file": folder / "users.txt", "admin_users": "postgres",
            "pool_mode": "transaction", "max_client_conn": 1000, "default_pool_size": 20,
            "logfile": folder / "log", "pidfile": folder / "pid", **settings,
        }  # fmt: skip
        lines = ["[databases]", f"* = host=127.0.0.1 port={postgres.port}", "[pgbouncer]"]
        lines += [f"{name} = {value}" for name, value in config.items()]
        (folder / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        # psycopg must not prepare statements: the next transaction may get another server
        # connection (docs/DEPLOY.md).
        self.plain_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.url = f"{self.plain_url}?prepare_threshold=none"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [self.PROGRAM, str(self.folder / "pgbouncer.ini")]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.wait_until_up()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.process = None

    def is_up(self) -> bool:
        return _connects(self.plain_url)

    def show(self, what: str) -> list[dict[str, str]]:
        """The admin console's SHOW WHAT (POOLS, CLIENTS, SERVERS), a dict per row."""
        result = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "pgbouncer",
             "-AF", "\t", "-c", f"SHOW {what}"],
            check=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        header, *rows = result.stdout.splitlines()[:-1]  # the last line counts the rows
        names = header.split("\t")
        return [dict(zip(names, row.split("\t"), strict=True)) for row in rows]


def _mariadbd() -> str | None:
    return shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/libexec")


class OwnRedis(OwnServer):
    """redis-server with an append-only file, so the journal survives a stop and start;
    with `replica_of`, a read-only replica of that server."""

    def __init__(self, folder: Path, replica_of: OwnRedis | None = None):
        super().__init__(folder)
        if shutil.which("redis-server") is None:
            _missing("redis-server")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.replica_of = replica_of

    def start(self) -> None:
        primary = ["--replicaof", "127.0.0.1", str(self.replica_of.port)] if self.replica_of else []
        subprocess.run(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.folder), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--daemonize", "yes", "--logfile", str(self.folder / "log"),
             "--repl-diskless-sync-delay", "0", *primary],
            check=True, timeout=60,
        )  # fmt: skip
        self.wait_until_up()

    def stop(self) -> None:
        # SHUTDOWN answers by closing the connection; the server is gone once it stops answering.
        with contextlib.suppress(redis.exceptions.ConnectionError):
            self.client().shutdown()
        deadline = time.monotonic() + 30
        while self.is_up() and time.monotonic() < deadline:
            time.sleep(0.1)

    def client(self) -> redis.Redis:
        """One try per command: redis-py's default retries a refused connection three times
        with backoff, seconds per check of a server that is down."""
        return redis.Redis(port=self.port, socket_connect_timeout=1, retry=NO_RETRY)

    def is_up(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.exceptions.ConnectionError:
            return False


# Ports below Linux's ephemeral range (32768-60999): no outgoing connection takes one while a
# server of the test's own is stopped, so it starts again on its port. Each xdist worker has
# its own thousand and hands them out in turn from a random start (another checkout's suite
# may be drawing from the same thousand).
PORTS_PER_WORKER = 1000
_FIRST_PORT = 20_000 + WORKER_INDEX % 12 * PORTS_PER_WORKER  # 12 thousands below 32768
WORKER_PORTS = range(_FIRST_PORT, _FIRST_PORT + PORTS_PER_WORKER)
_next_ports = itertools.islice(
    itertools.cycle(WORKER_PORTS), random.randrange(PORTS_PER_WORKER), None
)


def free_port() -> int:
    """A port nothing listens on, never the same twice in a row of a thousand."""
    for port in itertools.islice(_next_ports, PORTS_PER_WORKER):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no free port in {WORKER_PORTS}")


def _connects(url: str) -> bool:
    try:
        _ping("postgresql", url)
    except Exception:
        return False
    return True


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} must be installed in CI")
    pytest.skip(f"{what} not installed")
