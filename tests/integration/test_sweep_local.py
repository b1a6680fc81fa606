"""The sweep's local process runner: a driver stopped by a signal ends its workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    from megex.experiments import sweep

    OUT = Path(sys.argv[1])

    def slow(job):
        (OUT / f"worker-{job['i']}.pid").write_text(str(os.getpid()))
        time.sleep(600)

    if __name__ == "__main__":
        try:
            sweep.run_jobs([{"i": i} for i in range(3)], 2, print, slow)
        except KeyboardInterrupt as exc:
            (OUT / "driver.txt").write_text(f"stopped: {exc}")
            sys.exit(130)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone in all but name (its parent has not reaped it yet).
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_driver_stopped_by_a_signal_ends_its_workers(tmp_path, signum):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    driver = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 120
        pid_files = []
        while len(pid_files) < 2:
            assert driver.poll() is None, "the driver ended before its workers started"
            assert time.monotonic() < deadline, "the two workers did not start in 120 s"
            time.sleep(0.2)
            pid_files = sorted(tmp_path.glob("worker-*.pid"))
        workers = [int(p.read_text()) for p in pid_files]
        assert all(_alive(pid) for pid in workers)
        driver.send_signal(signum)
        assert driver.wait(timeout=60) == 130
        assert (tmp_path / "driver.txt").read_text() == f"stopped: {signum.name}"
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "a worker outlived its driver"
        # The third job never started: nothing is left queued either.
        assert len(list(tmp_path.glob("worker-*.pid"))) == 2
    finally:
        if driver.poll() is None:
            driver.kill()
