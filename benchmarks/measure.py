"""Measure one command as the OS sees it: wall time, peak resident memory, bytes read from disk.

The command runs in its own process group. Every ``interval`` seconds the sampler walks the
process tree (/proc/PID/task/*/children) and reads each member's /proc/PID/status (VmRSS,
VmHWM, RssAnon, RssFile) and /proc/PID/io (read_bytes, rchar). When the command exits,
``os.wait4`` gives the kernel's own totals for it and the children it waited for:
ru_maxrss (peak RSS of the largest process, exact, not sampled) and ru_inblock (512-byte
blocks read from storage, exact).

What each number means:
- ``peak_rss_mib``: the command's VmHWM, its own peak, sampled until it exits (wait4's
  ru_maxrss, also recorded, carries a big forking parent's peak across exec). What the goals use.
- ``peak_tree_rss_mib``: the largest sum of VmRSS over the tree seen by the sampler; equals
  peak_rss_mib for a single process, catches memory split over several.
- ``peak_anon_mib`` / ``peak_file_mib``: RSS split into anonymous memory (tensors) and file
  pages (mmapped safetensors count here while mapped; the kernel can drop them under pressure).
- ``disk_read_bytes``: ru_inblock × 512: bytes that came from the device. Pages already in
  the page cache are not counted, so callers evict the checkpoint first (``evict``).
- ``rchar_bytes``: bytes returned by read()-like syscalls, cached or not; mmap reads (how
  safetensors reads) are not counted. The command's own final value is read from its zombie
  (exited, not yet reaped); its children's are their last samples.

A memory limit is enforced here, not with ``prlimit --as``: an address-space cap counts every
mmapped shard and torch's reserved-but-untouched memory, so it would kill a streamed run that
maps 15 GB and touches 2 GB. Over the limit, the whole process group gets SIGKILL.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import tempfile
import time
from pathlib import Path

MIB = 2**20


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            pass
    return out


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return tree


def _read_kv(path: str) -> dict[str, int]:
    """/proc key: value files; values in kB (status) or bytes (io). Empty once the process is gone."""
    out = {}
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            fields = value.split()
            if fields and fields[0].isdigit():
                out[key] = int(fields[0])
    except OSError:
        pass
    return out


def resident_bytes(folder: str | Path) -> int | None:
    """Bytes of the folder's files now in the page cache (util-linux fincore), or None without it."""
    files = [str(f) for f in Path(folder).rglob("*") if f.is_file()]
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(int(x) for x in out.split())


def evict(folder: str | Path) -> dict:
    """Drop the folder's files from the page cache (posix_fadvise DONTNEED on those files only).

    No root and no global drop_caches: only this checkpoint's clean pages go, so other users'
    caches are untouched. Returns the resident bytes before and after, as fincore reports them.
    """
    before = resident_bytes(folder)
    for f in Path(folder).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages (a checkpoint just written) cannot be dropped until written back
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return {"resident_before_bytes": before, "resident_after_bytes": resident_bytes(folder)}


def _downsample(points: list[tuple[float, float]], n: int = 120) -> list[list[float]]:
    """At most n (seconds, MiB) points, each the maximum of its bucket, so peaks survive."""
    if len(points) <= n:
        return [[round(t, 1), round(m, 1)] for t, m in points]
    size = len(points) / n
    buckets = [points[int(i * size):int((i + 1) * size)] for i in range(n)]
    return [[round(b[-1][0], 1), round(max(m for _, m in b), 1)] for b in buckets if b]


def run(cmd: list[str], *, env: dict | None = None, cwd: str | None = None, timeout: float | None = None,
        mem_limit: int | None = None, interval: float = 0.2) -> dict:
    """Run ``cmd`` to completion (or until killed) and return its measurements; never raises on failure."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        peak = {"tree": 0, "anon": 0, "file": 0, "hwm": 0}
        io: dict[int, dict[str, int]] = {}  # last seen per pid, so children that exit early still count
        timeline, killed, killed_at = [], None, None
        while True:
            # Exited but not reaped yet: the zombie's /proc/PID/io still holds its final counters.
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                io[proc.pid] = _read_kv(f"/proc/{proc.pid}/io") or io.get(proc.pid, {})
                break
            elapsed = time.perf_counter() - start
            tree = {"tree": 0, "anon": 0, "file": 0}
            for pid in process_tree(proc.pid):
                st = _read_kv(f"/proc/{pid}/status")
                tree["tree"] += st.get("VmRSS", 0) * 1024
                tree["anon"] += st.get("RssAnon", 0) * 1024
                tree["file"] += st.get("RssFile", 0) * 1024
                peak["hwm"] = max(peak["hwm"], st.get("VmHWM", 0) * 1024)
                if counters := _read_kv(f"/proc/{pid}/io"):
                    io[pid] = counters
            for k in tree:
                peak[k] = max(peak[k], tree[k])
            timeline.append((elapsed, tree["tree"] / MIB))
            if killed is None and mem_limit and tree["tree"] > mem_limit:
                killed, killed_at = "memory limit", tree["tree"]
            elif killed is None and timeout and elapsed > timeout:
                killed, killed_at = "timeout", tree["tree"]
            if killed:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the group we started, nothing else
                except ProcessLookupError:
                    pass
            time.sleep(interval)
        wall = time.perf_counter() - start
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tells Popen not to wait again
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    stderr_lines = [line for line in stderr.splitlines() if line.strip()]
    return {
        "cmd": cmd, "exit_code": proc.returncode, "killed": killed,
        "killed_at_rss_mib": round(killed_at / MIB, 1) if killed_at else None,
        "wall_s": round(wall, 2),
        # The command's own high-water mark (VmHWM, sampled until it exits). Not wait4's
        # ru_maxrss alone: Linux carries the forking parent's peak into it across exec, so a
        # small command started from a big parent (a test runner) reports the parent's memory.
        "peak_rss_mib": round((peak["hwm"] / MIB) if peak["hwm"] else usage.ru_maxrss / 1024, 1),
        "ru_maxrss_mib": round(usage.ru_maxrss / 1024, 1),
        "peak_tree_rss_mib": round(peak["tree"] / MIB, 1), "peak_hwm_mib": round(peak["hwm"] / MIB, 1),
        "peak_anon_mib": round(peak["anon"] / MIB, 1), "peak_file_mib": round(peak["file"] / MIB, 1),
        "disk_read_bytes": usage.ru_inblock * 512,
        "disk_read_bytes_sampled": sum(c.get("read_bytes", 0) for c in io.values()),
        "rchar_bytes": sum(c.get("rchar", 0) for c in io.values()),
        # The harness's largest child so far (RUSAGE_CHILDREN is a running maximum, not this run's).
        "rusage_children_maxrss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "samples": len(timeline), "rss_timeline_mib": _downsample(timeline),
        "last_stderr_line": stderr_lines[-1][:300] if stderr_lines else "",
        "stdout": stdout,
    }
