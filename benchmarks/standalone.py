"""Standalone measurements: each contender in its own long-lived process.

A user runs ``qcompile bench`` or an ONNX Runtime script in a process of its own; measured
that way, no contender's worker threads (ONNX Runtime's and PyTorch's keep spinning after a
call) or allocations slow another.  :class:`Server` starts one such process per contender
(``python benchmarks/standalone.py --serve CONTENDER``: qcompile on ``TVM_NUM_THREADS``,
ONNX Runtime on ``intra_op_num_threads``, PyTorch on ``torch.set_num_threads``) and asks it
for one measurement at a time: load the file, warm up, wait for idle CPUs, run for the
given seconds, answer the median ms (``throughput.py``'s loader and timer).
:func:`interleaved_rounds` runs rounds over several servers, each round starting one
contender later.  ``latency.py --standalone`` and ``zoo_latency.py`` measure this way.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import select
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

IDLE_WINDOW_S = 0.5  # the idle-CPU check before each measurement
RESTART_RSS_MB = 3072  # a serving process above this is replaced before its next measurement
REQUEST_TIMEOUT_S = 300.0  # load, warm-up and idle wait of one measurement (plus the seconds timed)


def rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def serve(contender: str, threads: int) -> None:
    """A contender's standalone process: per JSON line on stdin ({"path", "feeds", "seconds"})
    one measurement, answered as one JSON line ({"ms", "runs", "waited_s", "idle", "rss_mb"}
    or {"error"}).  Anything the libraries print goes to stderr."""
    from throughput import make_runner, time_runner
    from zoo import first_line

    reply_to = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        request = json.loads(line)
        run = None
        try:
            with np.load(request["feeds"]) as arrays:
                feeds = {name: arrays[name] for name in arrays.files}
            run = make_runner(contender, request["path"], threads, feeds)
            reply: dict[str, Any] = time_runner(run, request["seconds"], IDLE_WINDOW_S)
        except Exception as exc:  # noqa: BLE001 (answered: the caller says it failed)
            reply = {"error": first_line(exc)}
        del run
        gc.collect()
        reply["rss_mb"] = round(rss_mb())
        reply_to.write(json.dumps(reply) + "\n")
        reply_to.flush()


class MeasureError(RuntimeError):
    """A measurement that gave no time: the artifact failed to load or run, or its process died."""


class Server:
    """The driver's handle on one contender's ``--serve`` process, started on first use and
    replaced after a crash, a hang or when it holds more than ``RESTART_RSS_MB``."""

    def __init__(self, contender: str, threads: int, log: Path) -> None:
        self.contender, self.threads, self.log = contender, threads, log
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, TVM_NUM_THREADS=str(self.threads), OMP_NUM_THREADS=str(self.threads))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", self.contender, "--threads", str(self.threads)]
        with open(self.log, "a") as err:
            return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                    env=env, start_new_session=True)

    def measure(self, path: str, feeds: str, seconds: float) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        self.proc.stdin.write(json.dumps({"path": path, "feeds": feeds, "seconds": seconds}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], REQUEST_TIMEOUT_S + seconds)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            code = self.proc.poll()
            self.close()
            raise MeasureError(f"its process {'hung' if code is None else f'exited ({code})'}; see {self.log}")
        reply = json.loads(line)
        if reply.get("rss_mb", 0) > RESTART_RSS_MB:
            self.close()
        if "error" in reply:
            raise MeasureError(reply["error"])
        return reply

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Measurer(Protocol):
    def measure(self, path: str, feeds: str, seconds: float) -> dict[str, Any]: ...


def interleaved_rounds(files: Mapping[str, str], servers: Mapping[str, Measurer], feeds: str, rounds: int,
                       seconds: float, orders: Sequence[Sequence[str]] | None = None,
                       ) -> tuple[dict[str, list[float]], dict[str, str], dict[str, float]]:
    """``rounds`` rounds of one measurement per contender of ``files`` (in ``orders[round]``
    where given, else each round starting one contender later): ({contender: ms per round},
    {contender: error}, {"idle_wait_s": seconds waited for idle CPUs, "busy_starts":
    measurements that started without idle CPUs}).  A contender that fails once is not asked
    again and has no row."""
    names = list(files)
    per_round: dict[str, list[float]] = {c: [] for c in names}
    errors: dict[str, str] = {}
    waits = {"idle_wait_s": 0.0, "busy_starts": 0}
    for index in range(rounds):
        order = orders[index] if orders else names[index % len(names):] + names[:index % len(names)]
        for contender in order:
            if contender in errors:
                continue
            try:
                reply = servers[contender].measure(files[contender], feeds, seconds)
            except MeasureError as exc:
                errors[contender] = str(exc)
                per_round.pop(contender)
                continue
            per_round[contender].append(reply["ms"])
            waits["idle_wait_s"] += reply["waited_s"]
            waits["busy_starts"] += not reply["idle"]
    waits["idle_wait_s"] = round(waits["idle_wait_s"], 1)
    return per_round, errors, waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", required=True, help="the contender this process measures")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    serve(args.serve, args.threads)


if __name__ == "__main__":
    main()
