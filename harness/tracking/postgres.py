"""A PostgreSQL server of the tracking store's own, in a folder (issue 14).

``midasbench tracking-server --postgres-dir DIR`` runs the MLflow server on it where no system PostgreSQL
is set up (a workstation running a large local sweep, a head node without root to install one), and the
tests and ``benchmarks/bench_tracking_load.py`` use it to run the cluster's backend on one machine. The
folder is created by ``initdb`` on first use and kept: the store survives restarts of the server and of
the machine. It listens on the loopback interface only, with ``trust`` authentication for the database
user: a store for a machine whose users you trust; a shared head node uses the system PostgreSQL that
``cluster.yaml`` installs, with a password.

Binaries: ``pg_ctl`` and ``initdb`` on ``PATH``, else the newest of Debian's
``/usr/lib/postgresql/<version>/bin``. PostgreSQL refuses to run as root; as root, the server runs as the
``postgres`` user (through ``runuser``), which owns the folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from midasbench.harness.errors import ConfigError

SERVER_USER = "postgres"  # who runs the server when we are root


class PostgresUnavailable(ConfigError):
    """PostgreSQL's programs, its Python driver or a user to run it as are missing (says which)."""


def find_bin_dir(installed: Path = Path("/usr/lib/postgresql")) -> Path:
    """The folder holding ``pg_ctl`` and ``initdb``: on ``PATH``, else the newest version in
    ``installed`` (Debian's layout, ``<version>/bin``)."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    versions = installed.glob("*/bin/pg_ctl")
    for pg_ctl in sorted(versions, key=lambda p: _version(p.parent.parent.name), reverse=True):
        if (pg_ctl.parent / "initdb").is_file():
            return pg_ctl.parent
    raise PostgresUnavailable(
        f"PostgreSQL is not installed here: no pg_ctl and initdb on PATH or in {installed}/*/bin "
        "(e.g. apt-get install postgresql)"
    )


def _version(name: str) -> tuple[int, ...]:
    """``"15"`` → ``(15,)``, ``"9.6"`` → ``(9, 6)``; a folder not named by a version sorts first."""
    parts = name.split(".")
    return tuple(int(part) for part in parts) if all(part.isdigit() for part in parts) else ()


def require_driver() -> None:
    """The driver SQLAlchemy (and so MLflow) uses for a ``postgresql://`` store is psycopg 3."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise PostgresUnavailable(
            "MLflow needs the psycopg driver for a postgresql:// store: pip install 'midasbench[cluster]'"
        ) from None


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"PostgreSQL does not run as root, and there is no '{SERVER_USER}' user to run it as"
        ) from None
    if shutil.which("runuser") is None:
        raise PostgresUnavailable("PostgreSQL does not run as root, and runuser is missing to switch user")
    return SERVER_USER


@dataclass
class LocalPostgres:
    data_dir: Path
    port: int = 5432
    max_connections: int = 300
    user: str = "mlflow"
    host: str = "127.0.0.1"
    bin_dir: Path = field(default_factory=find_bin_dir)
    run_as: str | None = field(default_factory=_run_as)

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def url(self, database: str = "mlflow") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def ensure_running(self, database: str = "mlflow") -> str:
        """Initialise the folder on first use, start the server unless it runs, create ``database``
        unless it exists; returns the database's URL. The driver is checked first: nothing is made
        for a store MLflow could not open."""
        require_driver()
        self.init()
        self.keep_up()
        self.create_database(database)
        return self.url(database)

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").is_file():
            return
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise ConfigError(f"{self.data_dir}: neither empty nor a PostgreSQL data folder; give another")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            shutil.chown(self.data_dir, self.run_as, self.run_as)
            if subprocess.run(self._as_server_user(["test", "-w", str(self.data_dir)])).returncode != 0:
                raise ConfigError(
                    f"{self.data_dir}: the '{self.run_as}' user that runs PostgreSQL cannot enter it; give a "
                    "folder whose parents every user may enter"
                )
        data = str(self.data_dir)
        self._pg("initdb", "-D", data, "-U", self.user, "--auth=trust", "-E", "UTF8", "--locale=C")

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses={self.host} -c unix_socket_directories={self.data_dir} "
            f"-c max_connections={self.max_connections}"
        )
        data, log = str(self.data_dir), str(self.log_file)
        self._pg("pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start")

    def keep_up(self) -> None:
        """Start the server if it is down (the tracking server's supervisor calls this now and then)."""
        if not self.running():
            self.start()

    def running(self) -> bool:
        return self._pg("pg_ctl", "-D", str(self.data_dir), "status", check=False).returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed; the next start recovers from its WAL)."""
        if self.running():
            self._pg("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> None:
        import psycopg

        # CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                connection.execute(f'CREATE DATABASE "{name}"')

    def _as_server_user(self, command: list[str]) -> list[str]:
        return command if self.run_as is None else ["runuser", "-u", self.run_as, "--", *command]

    def _pg(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = self._as_server_user([str(self.bin_dir / program), *args])
        done = subprocess.run(command, capture_output=True, text=True, cwd="/")
        if check and done.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.is_file() else ""
            raise ConfigError(
                f"PostgreSQL in {self.data_dir}: {' '.join(command)} failed with {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-1500:]}"
                + (f"\n{self.log_file}:\n{log}" if log else "")
            )
        return done
