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
is larger, plus the CPU growth of the service processes (and their descendants) over the run.

CPU by role: each root process's own CPU (all its threads, none of its children: the daemon,
hence the owner, for `meshctl run` and `mesh up`) apart from its descendants' (the workers).
Nothing depends on a sample landing before a process ends: the command is read once more when it
has exited and before it is reaped (a zombie's /proc/PID/stat still holds its own CPU and its
reaped children's), and its rusage from wait4 holds every descendant it (transitively) reaped; a
service is alive before and after the command, so reading it then is exact, and its descendants
that ended in between are in the CPU of whoever reaped them (children_user/children_system).
Samples of these two numbers, cumulative, with their wall-clock time (`cpu_series`), let a caller
estimate the CPU of a window inside the run (`Measurement.cpu_between`: a job's, without the
command's start-up and shutdown). Memory and the process lists are sampled every `interval`
(0.1 s), CPU alone every `cpu_interval` (20 ms) in between.
"""
from __future__ import annotations

import bisect
import math
import os
import select
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
    # per root process, same order: CPU seconds (user + system) over the run of the process alone
    # (all its threads, none of its children) and of all its descendants together
    root_cpu_s: list[float] = field(default_factory=list)
    children_cpu_s: list[float] = field(default_factory=list)
    # per root process: (wall-clock time.time(), own CPU s, descendants' CPU s) since the run began,
    # cumulative, one point per sample (the first at the start, the last at the end)
    cpu_series: list[list[tuple[float, float, float]]] = field(default_factory=list)

    def cpu_between(self, root: int, t0: float, t1: float) -> tuple[float, float] | None:
        """(own, descendants') CPU seconds of root process `root` between wall-clock times t0 and
        t1, interpolated linearly between samples (every `cpu_interval`, 20 ms): an estimate, off
        by at most the CPU of one sample interval at each end. None when the series does not span
        [t0, t1] (a clock step, or a window not inside the run)."""
        series = self.cpu_series[root] if root < len(self.cpu_series) else []
        if len(series) < 2 or not series[0][0] - 0.5 <= t0 <= t1 <= series[-1][0] + 0.5:
            return None
        own = _interpolate(series, t1, 1) - _interpolate(series, t0, 1)
        kids = _interpolate(series, t1, 2) - _interpolate(series, t0, 2)
        return max(0.0, own), max(0.0, kids)


def _interpolate(series: list[tuple[float, float, float]], t: float, i: int) -> float:
    times = [p[0] for p in series]
    j = bisect.bisect_right(times, t)
    if j == 0:
        return series[0][i]
    if j == len(series):
        return series[-1][i]
    (ta, *a), (tb, *b) = series[j - 1], series[j]
    if tb <= ta:
        return b[i - 1]
    return a[i - 1] + (b[i - 1] - a[i - 1]) * (t - ta) / (tb - ta)


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _cpu_and_reaped(p: psutil.Process) -> tuple[float, float]:
    """(own CPU, CPU of the children it has reaped) of one process."""
    t = p.cpu_times()
    return t.user + t.system, getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)


def _exited_times(pid: int) -> tuple[float, float] | None:
    """(own CPU, reaped children's CPU) of a process that has exited and is not reaped yet: a
    zombie's /proc/PID/stat keeps both (fields 14-17, in clock ticks). None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()
        tick = os.sysconf("SC_CLK_TCK")
        utime, stime, cutime, cstime = (int(x) / tick for x in fields[11:15])
    except (OSError, ValueError, IndexError):
        return None
    return utime + stime, cutime + cstime


class _Sampler:
    def __init__(self, roots: list[int]):
        self.roots = roots
        self.first: dict[tuple, float] = {}
        self.last: dict[tuple, float] = {}
        self.procs: dict[int, psutil.Process] = {}
        self.root_peak_pss: dict[int, int] = {}  # root pid -> peak PSS of that process alone
        # root pid -> [(time.time(), own CPU, descendants' CPU)], raw cumulative values
        self.series: dict[int, list[tuple[float, float, float]]] = {pid: [] for pid in roots}
        self._cached: list | None = None  # the trees as the last full sample found them

    def _tree(self) -> list[tuple[int, psutil.Process, list[psutil.Process]]]:
        out = []
        for pid in self.roots:
            try:
                root = self.procs.get(pid) or psutil.Process(pid)
                self.procs[pid] = root
                out.append((pid, root, root.children(recursive=True)))
            except psutil.Error:
                pass
        return out

    def sample(self, pss: bool = True) -> tuple[int, int]:
        """CPU and memory of every process of the trees (their process lists read anew)."""
        self._cached = self._tree()
        return self._read(self._cached, pss, memory=True)

    def sample_cpu(self) -> None:
        """CPU alone, of the processes found by the last `sample` (cheap: no /proc scan, no smaps)."""
        if self._cached is None:
            self._cached = self._tree()
        self._read(self._cached, False, memory=False)

    def _read(self, trees, pss: bool, memory: bool) -> tuple[int, int]:
        rss = pss_sum = 0
        for pid, root, children in trees:
            own = kids = None
            for p in (root, *children):
                try:
                    key = (p.pid, p.create_time())
                    cpu, reaped = _cpu_and_reaped(p)
                    if p is root:
                        own, kids = cpu, reaped  # the children it reaped: theirs, not its own
                    elif kids is not None:
                        kids += cpu + reaped
                    if memory and pss:
                        mi = p.memory_full_info()
                        rss += mi.rss
                        pss_sum += getattr(mi, "pss", mi.rss)
                        if p is root:
                            own_pss = getattr(mi, "pss", mi.rss)
                            self.root_peak_pss[pid] = max(self.root_peak_pss.get(pid, 0), own_pss)
                    elif memory:
                        rss += p.memory_info().rss
                except psutil.Error:
                    continue
                self.first.setdefault(key, cpu)
                self.last[key] = cpu
            if own is not None:
                self.series.setdefault(pid, []).append((time.time(), own, kids))
        return rss, pss_sum


def _watch(samplers: list[_Sampler], stop: threading.Event, interval: float, peaks: list[int],
           cpu_interval: float) -> None:
    """Memory (and the process lists) every `interval`, CPU alone every `cpu_interval` in between:
    fine CPU samples make a window's CPU (Measurement.cpu_between) a closer estimate."""
    ticks = max(1, round(interval / cpu_interval))
    tick = 0
    while not stop.wait(min(interval, cpu_interval)):
        tick += 1
        if tick % ticks:
            for s in samplers:
                s.sample_cpu()
            continue
        now = [s.sample() for s in samplers]
        peaks[0] = max(peaks[0], sum(r for r, _ in now))
        peaks[1] = max(peaks[1], sum(p for _, p in now))


def _wait_exited(proc: subprocess.Popen, deadline: float) -> None:
    """Return once the command has exited, without reaping it (it stays a zombie until wait4, so
    its /proc entry can still be read); kill it at the deadline. A pidfd where the OS has one."""
    killed = False
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while True:
                wait_ms = None if killed else max(0, math.ceil((deadline - time.monotonic()) * 1000))
                if poller.poll(wait_ms):
                    return
                proc.kill()
                killed = True
        finally:
            os.close(fd)
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if not killed and time.monotonic() > deadline:
            proc.kill()
            killed = True
        time.sleep(0.01)  # poll interval (no pidfd on this OS)


def run_measured(cmd: list[str], *, services: list[int] = (), env: dict | None = None, cwd: str | None = None,
                 timeout: float = 1800, interval: float = 0.1, cpu_interval: float = 0.02) -> Measurement:
    service_sampler = _Sampler(list(services))
    service_sampler.sample(pss=False)  # CPU baseline of the services (new keys start at their first sample)
    service_sampler.first = dict(service_sampler.last)
    base = {pid: pts[-1] for pid, pts in service_sampler.series.items() if pts}
    started = time.perf_counter()
    started_at = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    cmd_sampler = _Sampler([proc.pid])
    cmd_sampler.procs[proc.pid] = psutil.Process(proc.pid)
    cmd_sampler.first = {}
    stop, peaks = threading.Event(), [0, 0]
    watcher = threading.Thread(target=_watch, daemon=True,
                               args=([cmd_sampler, service_sampler], stop, interval, peaks, cpu_interval))
    watcher.start()
    # read output in threads so a chatty command never blocks on a full pipe
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda f=f, k=k: chunks[k].append(f.read()), daemon=True)
               for f, k in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for r in readers:
        r.start()
    _wait_exited(proc, time.monotonic() + timeout)
    wall = time.perf_counter() - started
    ended_at = time.time()
    exited = _exited_times(proc.pid)  # the zombie: its own CPU, before wait4 folds it into the total
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join(10)
    stop.set()
    watcher.join()
    service_sampler.sample()
    sampled_cmd = sum(cmd_sampler.last.values())  # new processes: all their CPU counts
    cmd_total = max(usage.ru_utime + usage.ru_stime, sampled_cmd)
    # the command by role: its own CPU (exact from the zombie; else the last sample) and the rest
    cmd_points = cmd_sampler.series.get(proc.pid) or []
    cmd_own = exited[0] if exited else (cmd_points[-1][1] if cmd_points else 0.0)
    cmd_own = min(cmd_own, cmd_total)
    series = [[(started_at, 0.0, 0.0), *[p for p in cmd_points if p[0] < ended_at],
               (ended_at, cmd_own, cmd_total - cmd_own)]]
    root_cpu, children_cpu = [cmd_own], [cmd_total - cmd_own]
    for pid in services:  # alive before and after the command: the difference is exact
        pts = service_sampler.series.get(pid) or []
        t0, own0, kids0 = base.get(pid, (started_at, 0.0, 0.0))
        pts = [(t, own - own0, kids - kids0) for t, own, kids in pts if t >= t0]
        series.append(pts)
        root_cpu.append(max(0.0, pts[-1][1]) if pts else 0.0)
        children_cpu.append(max(0.0, pts[-1][2]) if pts else 0.0)
    cpu = cmd_total + sum(root_cpu[1:]) + sum(children_cpu[1:])
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
                       peak_rss / 2**20, peak_pss / 2**20, [b / 2**20 for b in roots],
                       root_cpu, children_cpu, series)
