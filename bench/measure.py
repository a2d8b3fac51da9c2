"""Run a command and measure it: wall time, CPU seconds and peak memory of its whole process tree
(plus the PIDs of long-running services it talks to, and their children), sampled with psutil.

Memory is sampled as the sum of RSS and, where readable, of PSS (proportional set size: pages
shared between processes, e.g. after fork, are split between them instead of counted in each),
and never reported below the kernel's own peak of the command (`ru_maxrss` from wait4): nothing
here depends on a sample landing while a short process lives.
Each root process (the command itself, each service PID) also has its own peak PSS, of that one
process without its children: `meshctl run` runs the daemon (the owner of every job) in its own
process and its workers as children, so the root's peak is the owner's.
CPU seconds: the command's own rusage (it and the children it reaped) or the sampled sum, whichever
is larger, plus the sampled CPU growth of the service processes over the run.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class Measurement:
    returncode: int
    stdout: bytes
    stderr: bytes
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    peak_pss_mb: float
    # peak PSS of each root process alone (no children): [the command, *services], in MB
    root_peak_pss_mb: list[float] = field(default_factory=list)


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


class _Sampler:
    def __init__(self, roots: list[int]):
        self.roots = roots
        self.first: dict[tuple, float] = {}
        self.last: dict[tuple, float] = {}
        self.procs: dict[int, psutil.Process] = {}
        self.root_peak_pss: dict[int, int] = {}  # root pid -> peak PSS of that process alone

    def _tree(self) -> list[psutil.Process]:
        out = []
        for pid in self.roots:
            try:
                root = self.procs.get(pid) or psutil.Process(pid)
                self.procs[pid] = root
                out.append(root)
                out.extend(root.children(recursive=True))
            except psutil.Error:
                pass
        return out

    def sample(self, pss: bool = True) -> tuple[int, int]:
        rss = pss_sum = 0
        for p in self._tree():
            try:
                key = (p.pid, p.create_time())
                cpu = _cpu(p)
                if pss:
                    mi = p.memory_full_info()
                    rss += mi.rss
                    pss_sum += getattr(mi, "pss", mi.rss)
                    if p.pid in self.roots:
                        own = getattr(mi, "pss", mi.rss)
                        self.root_peak_pss[p.pid] = max(self.root_peak_pss.get(p.pid, 0), own)
                else:
                    rss += p.memory_info().rss
            except psutil.Error:
                continue
            self.first.setdefault(key, cpu)
            self.last[key] = cpu
        return rss, pss_sum


def _watch(samplers: list[_Sampler], stop: threading.Event, interval: float, peaks: list[int]) -> None:
    while not stop.wait(interval):
        now = [s.sample() for s in samplers]
        peaks[0] = max(peaks[0], sum(r for r, _ in now))
        peaks[1] = max(peaks[1], sum(p for _, p in now))


def run_measured(cmd: list[str], *, services: list[int] = (), env: dict | None = None, cwd: str | None = None,
                 timeout: float = 1800, interval: float = 0.1) -> Measurement:
    service_sampler = _Sampler(list(services))
    service_sampler.sample(pss=False)  # CPU baseline of the services (new keys start at their first sample)
    service_sampler.first = dict(service_sampler.last)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    cmd_sampler = _Sampler([proc.pid])
    cmd_sampler.procs[proc.pid] = psutil.Process(proc.pid)
    cmd_sampler.first = {}
    stop, peaks = threading.Event(), [0, 0]
    watcher = threading.Thread(target=_watch, args=([cmd_sampler, service_sampler], stop, interval, peaks), daemon=True)
    watcher.start()
    # read output in threads so a chatty command never blocks on a full pipe
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda f=f, k=k: chunks[k].append(f.read()), daemon=True)
               for f, k in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout
    status = usage = None
    while status is None:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == 0:
            status = None
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.01)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join(10)
    stop.set()
    watcher.join()
    service_sampler.sample()
    sampled_cmd = sum(cmd_sampler.last.values())  # new processes: all their CPU counts
    cpu = max(usage.ru_utime + usage.ru_stime, sampled_cmd)
    cpu += sum(v - service_sampler.first.get(k, 0.0) for k, v in service_sampler.last.items())
    # The kernel's peak of the command (and of the children it reaped): a run too short to be
    # sampled at all (70 ms on a fast machine) still reports its memory. ru_maxrss is one
    # process's RSS, a lower bound of the tree's; PSS <= RSS, so it stands in for an unsampled PSS.
    kernel_peak = usage.ru_maxrss * 1024
    peak_rss = max(peaks[0], kernel_peak)
    peak_pss = peaks[1] if peaks[1] > 0 else kernel_peak
    # never sampled: the kernel's peak (of the largest process of the tree) stands in, an upper bound
    roots = [cmd_sampler.root_peak_pss.get(proc.pid) or kernel_peak]
    roots += [service_sampler.root_peak_pss.get(pid, 0) for pid in services]
    return Measurement(proc.returncode, b"".join(chunks["out"]), b"".join(chunks["err"]), wall, cpu,
                       peak_rss / 2**20, peak_pss / 2**20, [b / 2**20 for b in roots])
