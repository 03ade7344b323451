"""Suite-wide set-up: 8 virtual CPU devices (before jax is imported), a private token cache and
compilation cache, a throwaway PostgreSQL server for the sweep store's tests, and no test leaves
a process behind.

Tests import the helpers here as `from conftest import ...` (pytest puts tests/ on sys.path)."""

import atexit
import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

# The suite compiles hundreds of tiny programs whose run time is negligible; LLVM's cheapest
# optimisation cuts each CPU compile by 15-30%. Every process a test starts gets the same flags,
# so numbers a test compares come from identically compiled code.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` virtual CPU devices."""
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from research.train import compile_cache  # noqa: E402

# The commands the tests run (in process and as subprocesses) turn on JAX's persistent
# compilation cache: this run gets a cache of its own, shared by its tests and removed at exit,
# so the suite neither reads executables from nor fills the user's ~/.cache/research/jax.
os.environ[compile_cache.ENV] = tempfile.mkdtemp(prefix="research-test-jax-")
atexit.register(shutil.rmtree, os.environ[compile_cache.ENV], ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """All processes below `pid` (Linux /proc), children first found, grandchildren after."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # the field after the parenthesised name: state, then the parent's pid
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


@pytest.fixture(autouse=True)
def _kill_started_processes(monkeypatch):
    """Every process a test starts (and everything it started, e.g. a sweep's trials in their
    own sessions) is killed when the test ends, passed, failed or timed out (pytest-timeout), so
    a hung child never outlives its test or holds the suite."""
    started: list[subprocess.Popen] = []
    original = subprocess.Popen.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", init)
    yield
    for proc in started:  # (one that has ended has no descendants left: they were reparented)
        if proc.poll() is None:
            for pid in [*_descendants(proc.pid), proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()


def process_gone(pid: int) -> bool:
    """Whether `pid` has exited: no /proc entry, or a zombie (state Z) its parent has not reaped
    yet (a reaped-late zombie would otherwise look alive for as long as the parent lives)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def newest_checkpoint(run_dir: Path) -> int:
    """The newest step saved in a run directory (0: none yet). Retention deletes old steps, so
    waiting for "some step >= N" cannot miss its moment the way waiting for step N can."""
    folder = Path(run_dir) / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps, default=0)


@pytest.fixture(scope="session")
def token_cache_dir(tmp_path_factory) -> str:
    """One token cache for the whole session: the built-in corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory):
    """sft.jsonl and dpo.jsonl derived, as the built-in examples are, from a few stdlib modules
    (about 25 functions; most fit train.seq_len=128)."""
    import sysconfig
    from pathlib import Path

    from research.data.corpus import Document
    from research.data.examples import derive_examples

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py")
    out = tmp_path_factory.mktemp("examples")
    derive_examples(out, [Document(name, (stdlib / name).read_text()) for name in modules])
    return out


TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=4",
    "train.batch_size=8", "train.seq_len=32", "train.steps=6", "train.log_every=1",
    "train.eval_every=3", "train.eval_batches=2", "checkpoint.every=3", "optim.warmup_steps=2",
    "logging.progress=false", "logging.peak_flops=1e12",
]


@pytest.fixture
def tiny_overrides(token_cache_dir) -> list[str]:
    """Overrides that make any experiment tiny (seconds to train) with the session's token cache."""
    return [*TINY, f"data.cache_dir={token_cache_dir}"]


@pytest.fixture
def tiny(tiny_overrides):
    """A builder of tiny experiment configs on the built-in corpus."""
    from research import config

    return lambda *overrides: config.load(None, [*tiny_overrides, *overrides])


# ----------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/N/bin."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    found = glob.glob("/usr/lib/postgresql/[0-9]*/bin/initdb")
    return Path(max(found, key=lambda path: int(Path(path).parts[-3]))).parent if found else None


class PostgresServer:
    """A PostgreSQL cluster of our own: a temp dir, a free loopback port, trust auth, no fsync.

    initdb refuses to run as root, so under root the server runs as `nobody`, owner of the dir.
    """

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="research-pg-"))
        self.data = self.dir / "data"
        self.as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        self.databases = itertools.count()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        try:
            if self.as_user:
                shutil.chown(self.dir, "nobody")
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync")
            self.start()
        except BaseException:
            self.close()
            raise

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bindir / program), *args], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-o",
                  f"-h 127.0.0.1 -p {self.port} -k {self.dir} -F", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database (one per test, so tests never see each other's rows)."""
        import sqlalchemy as sa

        name = f"test{next(self.databases)}"
        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        engine.dispose()
        return self.url(name)

    def close(self) -> None:
        """Stop the server (if it runs) and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                            "immediate", "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """One server for the session, stopped and removed at its end, also after failures."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed; .ci/run "
                    "installs them (apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'research[postgres]'")
    server = PostgresServer(bindir)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A sweep store URL: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sweep.db"
    return request.getfixturevalue("postgres_server").new_database()
