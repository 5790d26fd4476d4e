"""The methods bench's worker processes stop when the bench is killed (they would learn on into OUT/parts)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

BENCH = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from cidm.bench.methods import exit_with_parent

    if __name__ == "__main__":
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent,
                                   initargs=(os.getpid(), 0.1))
        print(pool.submit(os.getpid).result(), flush=True)
        pool.submit(time.sleep, 600)
        time.sleep(600)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_killed_bench_leaves_no_worker_running(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(BENCH)
    bench = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(bench.stdout.readline())
    assert alive(worker)
    bench.send_signal(signal.SIGKILL)  # as `kill -9` or an out-of-memory kill: no handler of the bench's runs
    bench.wait()
    deadline = time.time() + 20
    while alive(worker) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(worker)
