"""Visitors' session folders on a shared server: safe names, kept inside one root, removed after a time to live.

A session id comes from the client and is not trusted: its folder is named by a hash of it, so no id ('../victim',
'/etc', a megabyte of text) can name a path outside the root. The id is the key to the library: whoever sends it
gets that session's library, so it must stay as secret as the browser tab that made it (Gradio draws it at random).

    <root>/<32 hex digits>/                one session's library
    <root>/.downloads/<32 hex digits>/     that session's latest download (a zip)

Folders unused for `ttl` seconds are removed by `sweep_expired` (unless a writer holds their lock). The package knows
nothing of Gradio: the app passes the ids and the queue's contents in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .library import LOCK_FILE, inside

TTL_SECONDS = float(os.environ.get("CIDM_SESSION_TTL_HOURS", "24")) * 3600  # unused this long: removed
SWEEP_EVERY = 600.0  # seconds between two sweeps of one root at most
DOWNLOADS = ".downloads"
_HASHED = re.compile(r"^[0-9a-f]{32}$")
_last_sweep: dict[str, float] = {}
_sweep_lock = threading.Lock()


def session_key(session_id: str | None) -> str:
    """The folder name of a session: 32 hex digits of SHA-256 of its id, whatever the id holds."""
    return hashlib.sha256(str(session_id or "local").encode("utf-8", "surrogatepass")).hexdigest()[:32]


def session_dir(root: str | Path, session_id: str | None) -> Path:
    """The library folder of a session (not created): inside `root`, and marked as used now."""
    path = inside(root, Path(root) / session_key(session_id))
    touch(path)
    return path


def download_dir(root: str | Path, session_id: str | None) -> Path:
    """The folder that holds a session's latest download (created, emptied of older ones)."""
    path = inside(root, Path(root) / DOWNLOADS / session_key(session_id))
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def touch(path: Path) -> None:
    """Mark a session folder as used now (its modification time is its last use)."""
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def sweep_expired(root: str | Path, ttl: float = TTL_SECONDS, keep: tuple[Path, ...] = (), force: bool = False,
                  now: float | None = None) -> list[Path]:
    """Remove session folders, downloads and unfinished pulls unused for `ttl` seconds; returns what was removed.

    At most once every `SWEEP_EVERY` seconds per root unless `force`. Skips the folders in `keep` and any whose
    library lock another writer holds (a task still running keeps its folder).
    """
    root = Path(root)
    now = time.time() if now is None else now
    with _sweep_lock:
        if not force and now - _last_sweep.get(str(root), 0.0) < SWEEP_EVERY:
            return []
        _last_sweep[str(root)] = now
    if not root.is_dir():
        return []
    keep_resolved = {Path(k).resolve() for k in keep}
    candidates = [p for p in root.iterdir() if _HASHED.match(p.name) or p.name.startswith(".pull-")]
    if (root / DOWNLOADS).is_dir():
        candidates += [p for p in (root / DOWNLOADS).iterdir() if _HASHED.match(p.name)]
    removed = []
    for path in candidates:
        try:
            if path.is_symlink() or not path.is_dir() or path.resolve() in keep_resolved:
                continue
            if now - path.stat().st_mtime < ttl:
                continue
        except FileNotFoundError:
            continue
        lock = FileLock(str(path / LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a writer is at work in it
        except OSError:
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            lock.release()
        removed.append(path)
    return removed


class JobLimiter:
    """At most `limit` jobs per session queued or running at once, so that one visitor cannot fill the queue.

    `admit(session, queued)` is asked before a job joins the queue, with the ids of that session's jobs the queue
    holds now. A job admitted counts as pending until it starts (`running`); one that never starts (refused by a full
    queue, abandoned) stops counting after `grace` seconds. The session's jobs in flight are its running and pending
    ones, and never fewer than the queue holds: a burst of requests is counted before the queue registers them, and
    a job that waits long in the queue still counts.
    """

    def __init__(self, limit: int, grace: float = 5.0):
        self.limit, self.grace = limit, grace
        self._lock = threading.Lock()
        self._pending: dict[str, list[float]] = {}  # session -> times of admissions whose job has not started yet
        self._running: dict[str, int] = {}

    def admit(self, session: str, queued: set[str] | int = 0, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        queued = len(queued) if isinstance(queued, (set, frozenset, list, tuple)) else int(queued)
        with self._lock:
            pending = [t for t in self._pending.get(session, []) if now - t < self.grace]
            if max(len(pending) + self._running.get(session, 0), queued) >= self.limit:
                self._pending[session] = pending
                return False
            self._pending[session] = pending + [now]
            return True

    @contextlib.contextmanager
    def running(self, session: str):
        """Around a job's work: it no longer waits, it runs."""
        with self._lock:
            pending = self._pending.get(session, [])
            if pending:
                pending.pop(0)
            if not pending:
                self._pending.pop(session, None)
            self._running[session] = self._running.get(session, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._running[session] -= 1
                if not self._running[session]:
                    del self._running[session]
