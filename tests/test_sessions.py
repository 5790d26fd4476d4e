"""Session folders on a shared server: hashed names inside one root, a time to live, a per-session job limit
(issue 16, holes 1 and 6)."""

import os
import time

from cidm import sessions
from cidm.library import Library


def test_expired_session_folders_and_downloads_are_swept_live_ones_kept(tmp_path):
    root = tmp_path / "sessions"
    old, recent, busy = (sessions.session_dir(root, sid) for sid in ("old", "recent", "busy"))
    for folder in (old, recent, busy):
        (folder / "medic").mkdir(parents=True)
    zips = sessions.download_dir(root, "old")
    (zips / "cidm-library.zip").write_bytes(b"PK")
    holder = Library(busy)
    with holder.lock():  # a task still writes in it
        now = time.time()
        for path in (old, busy, zips, root / ".pull-abc"):
            path.mkdir(exist_ok=True)
            os.utime(path, (now - 2 * 3600, now - 2 * 3600))
        removed = sessions.sweep_expired(root, ttl=3600, force=True)
    assert sorted(removed) == sorted([old, zips, root / ".pull-abc"])
    assert recent.exists() and busy.exists() and not old.exists()
    assert sessions.sweep_expired(root, ttl=3600) == []  # at most once per SWEEP_EVERY


def test_session_ids_become_hashed_folder_names_inside_the_root(tmp_path):
    root = tmp_path / "sessions"
    for sid in ("../victim", "/etc", "..", "", "a" * 100_000, "x\x00y", "\udcff"):
        path = sessions.session_dir(root, sid)
        assert path.parent == root and len(path.name) == 32
    assert sessions.session_dir(root, "abc") == sessions.session_dir(root, "abc")
    assert sessions.session_dir(root, "abc") != sessions.session_dir(root, "abd")


def test_the_job_limiter_counts_a_burst_before_the_queue_does_and_forgets_dropped_jobs():
    jobs = sessions.JobLimiter(2, grace=1.0)
    assert [jobs.admit("s", set(), now=0.0) for _ in range(4)] == [True, True, False, False]  # none queued yet
    assert jobs.admit("t", set(), now=0.0)  # another session is not affected
    assert not jobs.admit("s", {"e1", "e2"}, now=0.5)  # both in the queue now
    assert jobs.admit("s", set(), now=5.0) and jobs.admit("s", set(), now=5.0)  # never started: not stuck
    assert not jobs.admit("s", {"e3", "e4"}, now=100.0)  # two waiting long in the queue: still two
    assert jobs.admit("s", {"e3"}, now=100.0)


def test_the_job_limiter_frees_a_slot_as_soon_as_a_job_ends():
    jobs = sessions.JobLimiter(2, grace=60.0)
    for _ in range(5):  # quick jobs one after another: never refused, however fast
        assert jobs.admit("s", set(), now=0.0)
        with jobs.running("s"):
            pass
    assert jobs.admit("s", set(), now=0.0)
    with jobs.running("s"):  # one running and one admitted: the third waits
        assert jobs.admit("s", set(), now=0.0)
        assert not jobs.admit("s", set(), now=0.0)
