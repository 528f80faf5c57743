"""A fleet on separate network hosts: Linux network namespaces joined by one bridge.

Each host is a namespace ``llmo-<name>`` with one veth into the bridge ``br-llmo`` (10.77.0.0/24); the
root namespace is 10.77.0.1 and plays the client. PostgreSQL runs on a host of its own (``pg``, a
server made with ``initdb`` in the scratch folder and run as the ``postgres`` user, so a test can stop
and start it for real); where the PostgreSQL binaries are not installed, the machine's server is used
instead, reached at 10.77.0.1 through a ``socat`` forwarder. Redis runs as a primary, a replica and
three Sentinels, each on its host; web hosts run gunicorn and worker hosts ``manage.py rqworker``, as an
operator starts them, every one with its own scratch folder (the hosts share no disk).

Everything is named with the ``llmo-`` prefix so that :func:`clean_stale` can remove what a killed run
left behind. Needs root (``ip netns``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = "br-llmo"
PREFIX = "llmo-"
SUBNET = "10.77.0"
GATEWAY = f"{SUBNET}.1"  # the root namespace: the PostgreSQL host and the client
SERVICE = "llmo"  # the Sentinel service name
REDIS_PORT = 6379
SENTINEL_PORT = 26379
WEB_PORT = 8000
PG_PORT = 5432


def postgres_bin() -> Path | None:
    """The folder of the newest installed PostgreSQL server (``initdb``, ``postgres``), if any, and a
    ``postgres`` user to run it (the server refuses to run as root)."""
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    found = sorted(glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    if found and shutil.which("setpriv"):
        return Path(found[-1]).parent
    return None


def missing_requirements() -> str | None:
    """Why the rig cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces (ip netns), as on CI"
    for tool in ("ip", "redis-server", "socat"):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH"
    probe = sh("ip", "netns", "add", f"{PREFIX}probe", check=False)
    if probe.returncode != 0:  # root without CAP_NET_ADMIN / CAP_SYS_ADMIN (an unprivileged container)
        return f"cannot make network namespaces here: {probe.stderr.strip()}"
    sh("ip", "netns", "del", f"{PREFIX}probe", check=False)
    return None


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def clean_stale() -> None:
    """Remove namespaces (and their processes) and the bridge a previous run left behind."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", name, check=False)
    sh("ip", "link", "del", BRIDGE, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        dev = line.split(":")[1].strip().split("@")[0]
        if dev.startswith("v" + PREFIX):
            sh("ip", "link", "del", dev, check=False)


@dataclass
class Host:
    name: str
    address: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return PREFIX + self.name

    @property
    def veth(self) -> str:  # the root end (interface names: at most 15 characters)
        return ("v" + PREFIX + self.name)[:15]


class Network:
    """The bridge and the hosts on it."""

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")

    def add(self, name: str, last_octet: int) -> Host:
        host = Host(name, f"{SUBNET}.{last_octet}")
        sh("ip", "netns", "add", host.netns)
        sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        sh("ip", "link", "set", host.veth, "master", BRIDGE)
        sh("ip", "link", "set", host.veth, "up")
        ns = ("ip", "netns", "exec", host.netns)
        sh(*ns, "ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
        sh(*ns, "ip", "link", "set", "eth0", "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        sh(*ns, "ip", "route", "add", "default", "via", GATEWAY)
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Unplug the host: its veth goes down, so nothing reaches it and it reaches nothing."""
        sh("ip", "link", "set", host.veth, "down")

    def plug(self, host: Host) -> None:
        sh("ip", "link", "set", host.veth, "up")

    def start(self, host: Host, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Run ``argv`` on ``host`` in a session of its own (so its children can be killed with it)."""
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, *argv],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc.log_path = log  # type: ignore[attr-defined]
        host.procs.append(proc)
        return proc

    def kill_host(self, host: Host) -> None:
        """``kill -9`` every process on the host (what a power cut does to them)."""
        for pid in sh("ip", "netns", "pids", host.netns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in host.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def tear_down(self) -> None:
        """``kill -9`` everything (a graceful stop would only cost time here), then remove the hosts."""
        for host in self.hosts.values():
            self.kill_host(host)
        clean_stale()


def wait_accepting(url: str, timeout: float) -> None:
    """Until PostgreSQL at ``url`` takes sessions: its port opens while it still answers "the database
    system is starting up" (seconds on a busy machine, when it replays its log)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url, connect_timeout=3).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wait_port(address: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=0.3):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                log = getattr(proc, "log_path", None)
                text = Path(log).read_text()[-3000:] if log else ""
                raise RuntimeError(f"{proc.args} exited ({proc.returncode}):\n{text}") from None
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers at {address}:{port} after {timeout:g} s")


class Fleet:
    """The hosts and the project's processes on them."""

    PG = {"pg": 5}
    REDIS = {"redis1": 11, "redis2": 12}
    SENTINELS = {"sentinel1": 21, "sentinel2": 22, "sentinel3": 23}
    WEBS = {"web1": 31, "web2": 32}
    WORKERS = {"worker1": 41, "worker2": 42, "worker3": 43}

    def __init__(self, database_url: str, env: dict[str, str], own_postgres: bool = False) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="llmo-fleet-"))
        self.scratch.chmod(0o755)  # the PostgreSQL host's server runs as ``postgres`` in a folder below
        self.net = Network()
        pg = self.PG if own_postgres else {}
        self.hosts = {
            name: self.net.add(name, octet)
            for name, octet in {**pg, **self.REDIS, **self.SENTINELS, **self.WEBS, **self.WORKERS}.items()
        }
        sentinels = ",".join(f"{self.hosts[n].address}:{SENTINEL_PORT}" for n in self.SENTINELS)
        self.redis_url = f"redis+sentinel://{sentinels}/{SERVICE}/0"
        self.database_url = database_url  # set by the fixture once the database is made, when ""
        self.base_env = {
            **env,
            "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings",
            "DATABASE_URL": database_url,
            "REDIS_URL": self.redis_url,
            "PYTHONUNBUFFERED": "1",
            "ALLOWED_HOSTS": ",".join(self.hosts[n].address for n in self.WEBS),
        }
        self.pg_forwarder: subprocess.Popen | None = None

    # --- PostgreSQL: a server on the ``pg`` host ------------------------------------------------
    def init_postgres(self, bin_dir: Path) -> str:
        """Make a cluster (trust authentication on the bridge) and start it; returns the server's URL."""
        self.pg_bin = bin_dir
        folder = self.scratch / "pg"
        folder.mkdir()
        shutil.chown(folder, "postgres", "postgres")
        data = folder / "data"
        sh("setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", str(bin_dir / "initdb"),
           "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")  # fmt: skip
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {SUBNET}.0/24 trust\n")
        self.start_postgres()
        return f"postgres://postgres@{self.hosts['pg'].address}:{PG_PORT}/postgres"

    def start_postgres(self) -> subprocess.Popen:
        host, folder = self.hosts["pg"], self.scratch / "pg"
        # fsync off: the rig measures the fleet, not this machine's disk (shared with other work).
        argv = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", str(self.pg_bin / "postgres")]
        argv += ["-D", str(folder / "data"), "-c", f"listen_addresses={host.address}", "-c", f"port={PG_PORT}"]
        argv += ["-c", f"unix_socket_directories={folder}", "-c", "max_connections=200", "-c", "fsync=off"]
        proc = self.net.start(host, argv, self.base_env, folder / f"log-{time.monotonic_ns()}")
        wait_port(host.address, PG_PORT, 30, proc)
        wait_accepting(f"postgres://postgres@{host.address}:{PG_PORT}/postgres", 60)
        return proc

    def stop_postgres(self) -> None:
        """A fast shutdown, as ``pg_ctl stop`` (and a restart) does: every session is ended (clients see
        ``terminating connection due to administrator command`` or a reset), then new ones are refused."""
        proc = self.hosts["pg"].procs[-1]
        postmaster = int((self.scratch / "pg" / "data" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGINT)
        proc.wait(timeout=30)

    def use_database(self, url: str) -> None:
        self.database_url = self.base_env["DATABASE_URL"] = url

    def stop_database(self) -> None:
        """The fleet's PostgreSQL goes away: its own server stops, or the forwarder to the machine's dies."""
        if "pg" in self.hosts:
            self.stop_postgres()
        else:
            self.stop_pg_forwarder()

    def start_database(self) -> None:
        if "pg" in self.hosts:
            self.start_postgres()
        else:
            self.start_pg_forwarder()

    # --- or the machine's server, reached at the gateway ----------------------------------------
    def start_pg_forwarder(self, pg_port: int = 5432) -> None:
        argv = ["socat", f"TCP-LISTEN:{pg_port},bind={GATEWAY},fork,reuseaddr", f"TCP:127.0.0.1:{pg_port}"]
        with open(self.scratch / "pg-forwarder.log", "w") as out:
            self.pg_forwarder = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(GATEWAY, pg_port, 10, self.pg_forwarder)

    def stop_pg_forwarder(self) -> None:
        """Every PostgreSQL connection of the fleet is cut and new ones refused (as in a restart)."""
        if self.pg_forwarder is not None and self.pg_forwarder.poll() is None:
            os.killpg(self.pg_forwarder.pid, signal.SIGKILL)
            self.pg_forwarder.wait()

    # --- Redis: primary, replica, three Sentinels ---------------------------------------------
    def start_redis(self) -> None:
        primary = self.hosts["redis1"].address
        for name in self.REDIS:
            self.start_redis_node(name, replica_of=None if name == "redis1" else primary)
        for name in self.REDIS:
            wait_port(self.hosts[name].address, REDIS_PORT, 10, self.hosts[name].procs[-1])
        for name in self.SENTINELS:
            host = self.hosts[name]
            folder = self.scratch / name
            folder.mkdir()
            conf = folder / "sentinel.conf"  # Sentinel rewrites its file: one per Sentinel, writable
            conf.write_text(
                f"port {SENTINEL_PORT}\nbind {host.address}\nprotected-mode no\ndir {folder}\n"
                f"sentinel monitor {SERVICE} {primary} {REDIS_PORT} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.net.start(host, ["redis-server", str(conf), "--sentinel"], self.base_env, folder / "log")
        for name in self.SENTINELS:
            wait_port(self.hosts[name].address, SENTINEL_PORT, 10, self.hosts[name].procs[-1])

    def start_redis_node(self, name: str, replica_of: str | None) -> subprocess.Popen:
        host = self.hosts[name]
        folder = self.scratch / name
        folder.mkdir(exist_ok=True)
        argv = ["redis-server", "--bind", host.address, "--port", str(REDIS_PORT), "--dir", str(folder)]
        argv += ["--protected-mode", "no", "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
        if replica_of:
            argv += ["--replicaof", replica_of, str(REDIS_PORT)]
        return self.net.start(host, argv, self.base_env, folder / f"log-{time.monotonic_ns()}")

    def primary(self) -> str:
        """The primary's address as the Sentinels see it now."""
        import redis

        for name in self.SENTINELS:
            try:
                client = redis.Redis(self.hosts[name].address, SENTINEL_PORT, socket_timeout=1)
                found = client.sentinel_get_master_addr_by_name(SERVICE)
                if found:
                    address = found[0]
                    return address.decode() if isinstance(address, bytes) else address
            except redis.RedisError:
                continue
        raise RuntimeError("no Sentinel knows the primary")

    def redis(self):
        """A client of the current primary, Sentinel-aware (the test's view of the fleet's Redis)."""
        from redis.sentinel import Sentinel

        sentinel = Sentinel(
            [(self.hosts[n].address, SENTINEL_PORT) for n in self.SENTINELS],
            socket_timeout=2,
            sentinel_kwargs={"socket_timeout": 1},
        )
        return sentinel.master_for(SERVICE, socket_timeout=2)

    # --- the project's processes ----------------------------------------------------------------
    def start_web(self, name: str) -> subprocess.Popen:
        host = self.hosts[name]
        var = self.scratch / name
        var.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "gunicorn", "orchestrator_site.asgi:application"]
        argv += ["-k", "uvicorn_worker.UvicornWorker", "-w", "1", "-b", f"{host.address}:{WEB_PORT}"]
        env = {**self.base_env, "VAR_DIR": str(var)}
        return self.net.start(host, argv, env, var / f"web-{time.monotonic_ns()}.log")

    def start_worker(self, name: str, **extra: str) -> subprocess.Popen:
        host = self.hosts[name]
        var = self.scratch / name
        var.mkdir(exist_ok=True)
        argv = [
            sys.executable,
            "manage.py",
            "rqworker",
            "high",
            "normal",
            "low",
            "--name",
            f"{name}-{time.monotonic_ns()}",
        ]
        env = {**self.base_env, "VAR_DIR": str(var), **extra}
        return self.net.start(host, argv, env, var / f"worker-{time.monotonic_ns()}.log")

    def web_url(self, name: str) -> str:
        return f"http://{self.hosts[name].address}:{WEB_PORT}"

    def wait_web(self, name: str, timeout: float = 60) -> None:
        wait_port(self.hosts[name].address, WEB_PORT, timeout, self.hosts[name].procs[-1])

    def logs(self, name: str, chars: int = 4000) -> str:
        out = []
        for proc in self.hosts[name].procs:
            path = getattr(proc, "log_path", None)
            if path and Path(path).exists():
                out.append(f"--- {path}\n{Path(path).read_text(errors='replace')[-chars:]}")
        return "\n".join(out)

    def tear_down(self) -> None:
        try:
            self.net.tear_down()
        finally:
            self.stop_pg_forwarder()
            keep = os.environ.get("FLEET_KEEP_LOGS")  # a folder to copy the hosts' logs to, for a post-mortem
            if keep:
                skip = shutil.ignore_patterns("data", "*.rdb", "*.aof*", "appendonlydir", ".s.PGSQL.*")
                with contextlib.suppress(shutil.Error, OSError):
                    shutil.copytree(self.scratch, keep, dirs_exist_ok=True, ignore=skip)
            shutil.rmtree(self.scratch, ignore_errors=True)
