"""One workload, run again and again until the agent stops it (guest/workloads/ says how to read its output).
Standard library only; run as `python3 -E -S workload.py JOB-JSON` by the agent.

Each run's output (stdout and stderr together) goes to a file of its own; each run's record - when, how it ended, its
metrics or why it has none, with its output's last lines - to workload.jsonl. The first run that exits non-zero or
prints nothing its parser knows ends the runner with status 1: the host fails the cell and names the workload. A
run cut short by the stop is recorded as stopped, neither measured nor failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

try:
    from .contract import WorkloadJob
    from .records import WorkloadRun
    from .workloads import WorkloadError, get
except ImportError:  # in a guest: its directory is sys.path[0]
    from contract import WorkloadJob  # type: ignore[no-redef]
    from records import WorkloadRun  # type: ignore[no-redef]
    from workloads import WorkloadError, get  # type: ignore[no-redef]

READ_LIMIT = 1 << 20  # of a run's output, its end: what a parser reads
TAIL_LINES = 15


def output_tail(path: str, limit: int = READ_LIMIT) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
        return f.read().decode("utf-8", "replace")


class Runner:
    def __init__(self, job: WorkloadJob):
        self.job, self.spec = job, job.spec
        self.workload = get(job.spec.kind)
        self.knobs = self.workload.params(job.spec.params)
        self.stopping = False
        self.child: subprocess.Popen | None = None

    def stop(self, *_: object) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()

    def stopped(self) -> bool:
        return self.stopping or os.path.exists(self.job.stop)

    def run_once(self, number: int) -> WorkloadRun:
        name = f"workload.{self.spec.name}.{number}.out"
        path = os.path.join(self.job.out, name)
        t0 = time.time_ns()
        with open(path, "wb") as out:
            self.child = subprocess.Popen(self.spec.argv, stdout=out, stderr=subprocess.STDOUT)
            try:
                status = self.child.wait(timeout=self.spec.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                self.child.kill()
                status, timed_out = self.child.wait(), True
        run = WorkloadRun(self.spec.name, number, t0, time.time_ns(), status=status, output=name)
        text = output_tail(path)
        if self.stopping:
            run.stopped = True
        elif timed_out:
            run.error = f"ran past its timeout of {self.spec.timeout_s:.0f}s"
        elif status != 0:
            run.error = f"exited with status {status}"
        else:
            try:
                run.metrics = self.workload.parse(self.knobs, text)
            except WorkloadError as e:
                run.error = str(e)
        if run.error:
            run.tail = "\n".join(text.splitlines()[-TAIL_LINES:])[-4000:]
        return run

    def main(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)  # the agent's stop: the run in progress ends as `stopped`
        records = os.path.join(self.job.out, "workload.jsonl")
        number = 0
        while not self.stopped():
            number += 1
            run = self.run_once(number)
            with open(records, "a") as f:
                f.write(run.to_json() + "\n")
            if run.error:
                return 1
            deadline = time.monotonic() + self.spec.pause_s
            while not self.stopped() and time.monotonic() < deadline:
                time.sleep(0.1)
        return 0


if __name__ == "__main__":
    sys.exit(Runner(WorkloadJob.from_dict(json.loads(sys.argv[1]))).main())
