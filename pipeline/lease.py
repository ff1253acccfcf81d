"""One writer per output partition: a lease object beside the data, and the workers' check on it.

A run takes the lease on its partition before it writes anything there and holds it until its
manifest is written::

    OUT/[dt=YYYY-MM-DD/]_lease.json   owner, host, boot_id, pid, pid_start, acquired_at, renewed_at,
                                      expires_at (Unix seconds, the holder's clock), ttl_s

It is created with an exclusive write (``O_CREAT | O_EXCL`` on local disk, ``If-None-Match: *``
on object stores), renewed by a heartbeat thread every ``ttl / 4`` seconds and deleted at the
end. A second run into the same partition refuses with one line naming the holder. A lease is
taken over when it has expired (its holder stopped renewing ``ttl`` seconds ago) or at once when
its holder ran on this machine and that process is gone (``kill -9``, then a rerun).

Workers check between shards (:func:`check_driver`): when their driver process has died (same
machine) or the lease now names another owner, they stop before committing anything more.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from vae_model.errors import StorageError, VaePipeError
from vae_model.storage import StorageOptions, describe_storage_error, fresh_fs, is_local, join, remove_if_exists

log = logging.getLogger(__name__)

LEASE = "_lease.json"
LEASE_TTL_S = 60.0


class LeaseHeldError(VaePipeError):
    """Another live run holds the output partition."""


class RunAbandonedError(VaePipeError):
    """A worker's driver is gone or no longer holds the lease: the worker must not commit."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if unknown): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def this_process() -> dict[str, Any]:
    """Who this process is, in a form another process on any machine can check."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "pid_start": _start_time(pid)}


def _on_this_machine(who: dict[str, Any]) -> bool:
    boot = _boot_id()
    return who.get("host") == socket.gethostname() and bool(boot) and who.get("boot_id") == boot


def process_gone(who: dict[str, Any]) -> bool:
    """True when ``who`` (from :func:`this_process`) ran on this machine and has exited."""
    if not _on_this_machine(who):
        return False
    pid = who.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = who.get("pid_start")
    return bool(start) and _start_time(pid) != start  # the pid was reused by another process


def describe_holder(lease: dict[str, Any]) -> str:
    expires = dt.datetime.fromtimestamp(float(lease.get("expires_at", 0)), dt.timezone.utc)
    return (f"run {str(lease.get('owner', '?'))[:12]} (pid {lease.get('pid', '?')} on {lease.get('host', '?')}, "
            f"since {lease.get('acquired_at', '?')}, lease expires {expires.isoformat(timespec='seconds')})")


def read_lease(partition_url: str, storage_options: StorageOptions = None) -> dict[str, Any] | None:
    """The partition's current lease, or None when there is none (or it is unreadable)."""
    url = join(partition_url, LEASE)
    fs, path = fresh_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}  # a torn or foreign file: treated as expired
    except Exception as exc:  # storage backends raise many types
        raise StorageError(describe_storage_error(url, exc)) from None
    return data if isinstance(data, dict) else {}


def _expired(lease: dict[str, Any], now: float) -> bool:
    try:
        return now > float(lease["expires_at"])
    except (KeyError, TypeError, ValueError):
        return True


class Lease:
    """The lease of one partition, as a context manager: acquire, heartbeat, release."""

    def __init__(self, partition_url: str, storage_options: StorageOptions = None, ttl: float = LEASE_TTL_S) -> None:
        self.partition_url, self.so, self.ttl = partition_url, storage_options, ttl
        self.url = join(partition_url, LEASE)
        self.owner = uuid.uuid4().hex
        self.lost = False
        self._acquired_at = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, **this_process(), "acquired_at": self._acquired_at,
                           "renewed_at": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="seconds"),
                           "expires_at": now + self.ttl, "ttl_s": self.ttl}).encode()

    def _create(self) -> bool:
        """Write the lease if none exists; False if one does."""
        fs, path = fresh_fs(self.url, self.so)
        data = self._record()
        try:
            if is_local(fs):
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                try:
                    fs.pipe_file(path, data, mode="create")
                except TypeError:  # a backend without exclusive create: check, then write (a small race)
                    if fs.exists(path):
                        return False
                    fs.pipe_file(path, data)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if "precondition" in str(exc).lower().replace("-", ""):  # S3's 412 for If-None-Match
                return False
            raise StorageError(describe_storage_error(self.url, exc)) from None
        except Exception as exc:  # storage backends raise many types
            raise StorageError(describe_storage_error(self.url, exc)) from None

    def _remove(self) -> None:
        remove_if_exists(self.url, self.so)

    def acquire(self) -> "Lease":
        self._acquired_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        for _ in range(5):
            if self._create():
                if (read_lease(self.partition_url, self.so) or {}).get("owner") == self.owner:
                    return self
                continue  # another run took it over between our create and read: look again
            current = read_lease(self.partition_url, self.so)
            if current is None:
                continue  # released in the meantime
            if not (_expired(current, time.time()) or process_gone(current)):
                raise LeaseHeldError(f"{self.partition_url} is being written by another {describe_holder(current)}; "
                                     "wait for it, or write to another --out/--run-date (delete "
                                     f"{self.url} only if you are sure that run is gone)")
            log.warning("taking over the lease of %s: %s", self.partition_url,
                        "holder gone" if current else "unreadable lease")
            self._remove()
        raise LeaseHeldError(f"{self.partition_url}: could not take the output lease (other runs keep taking it)")

    def renew(self) -> None:
        """Extend the lease; marks it ``lost`` if another run has taken it over."""
        current = read_lease(self.partition_url, self.so)
        if not current or current.get("owner") != self.owner:
            if not self.lost:
                log.error("lost the output lease of %s to %s", self.partition_url,
                          describe_holder(current) if current else "nobody (deleted)")
            self.lost = True
            return
        fs, path = fresh_fs(self.url, self.so)
        data = self._record()
        if is_local(fs):
            tmp = f"{path}.tmp-{self.owner}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)

    def release(self) -> None:
        current = read_lease(self.partition_url, self.so)
        if current and current.get("owner") == self.owner:
            self._remove()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except Exception as exc:  # a storage hiccup: the next beat tries again
                log.warning("renewing the output lease of %s failed: %s", self.partition_url, exc)

    def __enter__(self) -> "Lease":
        self.acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="vaepipe-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.release()
        except StorageError as err:
            log.warning("could not release the output lease %s: %s", self.url, err)


def check_driver(opts: Any, lease: bool = True) -> None:
    """Raise :class:`RunAbandonedError` when this worker's run is over: its driver process died
    (checked when it ran on this machine) or, with ``lease``, the partition's lease no longer
    names this run (another run took over). ``opts`` is the run's ``EmbedOptions``."""
    driver = getattr(opts, "driver", None)
    if driver and process_gone(driver):
        raise RunAbandonedError(f"the driver process (pid {driver.get('pid')}) of this run is gone; "
                                "this worker stops without committing more shards")
    owner = getattr(opts, "lease_owner", None)
    if lease and owner:
        current = read_lease(opts.partition_url, opts.storage_options)
        if not current or current.get("owner") != owner:
            who = describe_holder(current) if current else "nobody"
            raise RunAbandonedError(f"{opts.partition_url}: this run no longer holds the output lease (now: {who}); "
                                    "this worker stops without committing more shards")
