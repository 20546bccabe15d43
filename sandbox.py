"""
sandbox.py — run model-written Python programs, and the verdict on one completion.

    import sandbox
    sandbox.run_program("print(1)")                      # {returncode, stdout, stderr, runtime, ...}
    sandbox.check_completion(problem, completion)         # {passed, error, detail, runtime}
    sandbox.check_all([(problem, completion), ...], workers=16)

A problem is a dict: {"head", "tail"} (the program is head + completion + tail: HumanEval, MBPP)
or {"io_tests": [(stdin, expected stdout), ...], "time_limit"} (CodeContests). eval.py (pass@k)
and data.py (labelling MBPP mutants for the critic's demo data) both execute programs here.
See README "Evaluation" for what the sandbox does and does not protect against.
"""
from __future__ import annotations

import concurrent.futures
import errno
import functools
import math
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# Every program runs in its own process, in a new session (so its whole process group can be
# killed), in a fresh scratch directory that is deleted afterwards, with an environment built
# from scratch (nothing of ours -- HF_TOKEN, AWS_*, API keys -- is passed on), stdin closed or fed
# from a file, stdout/stderr captured to files, a wall-clock timeout, and rlimits on CPU time,
# address space, file size and number of processes.
#
# RLIMIT_NPROC counts all processes of the *real uid* on the machine, and the kernel does not
# enforce it for root at all. So when we are root (GPU boxes and containers usually are), every
# concurrently running program gets its own otherwise unused uid: the cap then counts exactly
# that program's processes, the program cannot write to anything outside its scratch directory
# but world-writable directories (which we sweep), cannot read root's files or other processes'
# environments, and after the run we can kill every process of that uid -- which catches a
# double-forked daemon that left the process group. Without root, the program runs as us: the
# cap is set to our current process count plus the allowance, and leftovers are found by a
# marker in their environment (Linux /proc).

# uids 0x78000000 + pid*64 + slot: above the ranges that sssd/LDAP and systemd hand out, below
# 2^31 (some tools treat uid_t as signed); derived from our pid so that two eval.py processes
# on one machine (torchrun ranks) never share one, since a sweep kills everything of its uid.
SANDBOX_UID_BASE = 0x78000000
MAX_WORKERS = 64
DROP_PRIVILEGES = sys.platform.startswith("linux") and os.geteuid() == 0
WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"

# Runs inside the sandboxed interpreter: set the limits on itself (hard = soft, so the program
# cannot raise them back), then run the program as __main__. Doing this here rather than in a
# Popen preexec_fn keeps it safe with our worker threads (preexec_fn can deadlock in threaded
# programs, per the subprocess docs). A limit the OS refuses (macOS and RLIMIT_AS) is skipped.
LAUNCHER = """
import resource, runpy, sys
path, cpu_s, mem_bytes, file_bytes, nproc = sys.argv[1], *map(int, sys.argv[2:])
for which, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, mem_bytes),
                     (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NPROC, nproc)):
    try:
        if value >= 0:
            resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass
sys.argv = [path]
runpy.run_path(path, run_name="__main__")
"""


def sandbox_uid(slot: int) -> int:
    return SANDBOX_UID_BASE + (os.getpid() % (1 << 20)) * MAX_WORKERS + slot


@functools.lru_cache(maxsize=None)
def sandbox_python(drop_privileges: bool, override: str | None = None) -> str:
    """The interpreter that runs programs. Ours, unless the sandbox uid cannot run it (a Python
    under /root, a home directory that is not world-readable): then a system python3."""
    candidates = [override] if override else [sys.executable, shutil.which("python3", path=SAFE_PATH)]
    if not drop_privileges:
        return candidates[0]
    uid = sandbox_uid(MAX_WORKERS - 1)
    for python in filter(None, candidates):
        try:
            probe = subprocess.run([python, "-s", "-c", "import collections, heapq, itertools, json, math, re"],
                                   user=uid, group=uid, extra_groups=[], cwd="/", env={"PATH": SAFE_PATH},
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        except OSError:  # cannot even execute it
            continue
        if probe.returncode == 0:
            if python != sys.executable:
                print(f"sandbox: programs run with {python} (uid {uid} cannot run {sys.executable})",
                      file=sys.stderr)
            return python
    raise RuntimeError(f"sandbox: no Python interpreter that an unprivileged uid can run among "
                       f"{candidates}; pass --sandbox_python=/path/to/python3")


def _processes(uid=None, marker=None) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`, or ours that carry `marker` in their
    environment. Reads /proc (Linux); elsewhere finds nothing."""
    found = []
    if not os.path.isdir("/proc"):
        return found
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
            if "\nState:\tZ" in status:  # already dead, only waiting for a parent to reap it
                continue
            real_uid = int(status.split("\nUid:", 1)[1].split()[0])
            if uid is not None and real_uid == uid:
                found.append(int(name))
            elif marker is not None and real_uid == os.getuid():
                with open(f"/proc/{name}/environ", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(name))
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked, or not ours to read
    return found


def _task_count(uid: int) -> int:
    """Processes + threads of `uid` (what RLIMIT_NPROC counts), from /proc."""
    total = 0
    for name in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
            if int(status.split("\nUid:", 1)[1].split()[0]) == uid:
                total += int(status.split("\nThreads:", 1)[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total


def kill_leftovers(uid=None, marker=None, python=None) -> bool:
    """Kill every process the program left behind; True once none is left."""
    for _ in range(200):
        pids = _processes(uid=uid, marker=marker)
        if not pids:
            return True
        if uid is not None:
            # kill(-1) sent from inside the uid reaches every process of that uid in one atomic
            # sweep of the process table: a fork bomb cannot outrun it, as it could a pid-by-pid
            # kill loop.
            subprocess.run([python, "-S", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"],
                           user=uid, group=uid, extra_groups=[], cwd="/", env={},
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=60)
        else:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.01)
    return False


def _remove_files_of(uid: int):
    """Delete what `uid` created in the world-writable directories: the only places outside its
    scratch directory where an unprivileged uid can create files. (Only their top level.)"""
    for d in {*WORLD_WRITABLE_DIRS, tempfile.gettempdir()}:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    os.unlink(e.path)
            except OSError:
                pass


def _rmtree(root: str):
    if os.geteuid() != 0:
        # A program may have chmod'ed its own directories to 0, which would stop a non-root
        # rmtree: give them back to us first, top-down, never following a symlink.
        try:
            os.chmod(root, 0o700)
        except OSError:
            pass
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    try:
                        os.chmod(p, 0o700)
                    except OSError:
                        pass
    shutil.rmtree(root, ignore_errors=True)


def run_program(source: str, stdin: str | None = None, timeout: float = 10.0, memory_mb: int = 2048,
                max_procs: int = 8, max_output_mb: int = 64, slot: int = 0,
                drop_privileges: bool = DROP_PRIVILEGES, python: str | None = None) -> dict:
    """Run one Python program in the sandbox -> {returncode, stdout, stderr, runtime, timed_out, clean}.

    `slot` (0..MAX_WORKERS-1) must be unique among programs running at the same time: it picks
    the sandbox uid. `max_procs` counts processes and threads, the program's own included; the
    memory limit is per process, so a program can use up to max_procs * memory_mb in all.
    `clean` is False if some process of the program could not be killed.
    """
    uid = sandbox_uid(slot) if drop_privileges else None
    python = python or sandbox_python(drop_privileges, None)
    marker = secrets.token_hex(16)
    scratch = tempfile.mkdtemp(prefix="wmtp-sandbox-")
    try:
        program = os.path.join(scratch, "program.py")
        with open(program, "w") as f:
            f.write(source)
        if uid is not None:
            os.chown(scratch, uid, uid)
        env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": scratch,
               "TMPDIR": scratch, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "WMTP_SANDBOX": marker}
        if uid is not None:
            nproc = max_procs
        else:  # counted against all of our own processes: allow ours + max_procs (-1: no /proc, no cap)
            nproc = _task_count(os.getuid()) + max_procs if os.path.isdir("/proc") else -1
        limits = [math.ceil(timeout) + 1, memory_mb << 20, max_output_mb << 20, nproc]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
            inp.write((stdin or "").encode())
            inp.seek(0)
            start = time.monotonic()
            proc = subprocess.Popen(
                [python, "-s", "-c", LAUNCHER, program, *map(str, limits)],
                stdin=inp if stdin is not None else subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=scratch, env=env, start_new_session=True,
                **({"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}))
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            runtime = time.monotonic() - start
            # Kill the whole group: on timeout, and also after a normal exit, when children the
            # program started in the background may still run. (After the leader is reaped its
            # pid is free again, but pids are handed out cyclically, so this group id is not
            # reused in the microseconds in between.)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
            clean = kill_leftovers(uid=uid, python=python) if uid is not None else kill_leftovers(marker=marker)
            if not clean:
                print(f"sandbox: WARNING: processes of {'uid %d' % uid if uid is not None else marker} "
                      f"survived SIGKILL", file=sys.stderr)
            out.seek(0)
            stdout = out.read().decode("utf-8", "replace")
            err.seek(0, os.SEEK_END)
            err.seek(max(0, err.tell() - 8192))  # the end of a traceback says what went wrong
            stderr = err.read().decode("utf-8", "replace")
    finally:
        _rmtree(scratch)
        if uid is not None:
            _remove_files_of(uid)
    return {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr, "runtime": runtime,
            "timed_out": timed_out, "clean": clean}


_EXCEPTION_KINDS = {"SyntaxError": "syntax_error", "IndentationError": "syntax_error",
                    "TabError": "syntax_error", "AssertionError": "wrong_answer",
                    "MemoryError": "memory", "BlockingIOError": "process_limit"}


def error_kind(run: dict) -> str | None:
    """What went wrong in a run, from its exit status and the last line of its traceback."""
    rc = run["returncode"]
    if run["timed_out"] or rc in (-signal.SIGKILL, -signal.SIGXCPU):  # wall clock or RLIMIT_CPU
        return "timeout"
    if rc == -signal.SIGXFSZ:
        return "output_limit"
    if rc < 0:
        return "runtime_error"  # crashed on a signal (segfault on a too-deep recursion, ...)
    if rc == 0:
        return None
    lines = [line for line in run["stderr"].splitlines() if line.strip()] or [""]
    if "can't start new thread" in lines[-1]:  # RuntimeError, from RLIMIT_NPROC
        return "process_limit"
    if os.strerror(errno.EFBIG) in lines[-1]:  # Python ignores SIGXFSZ, so RLIMIT_FSIZE shows
        return "output_limit"                  # as an OSError(EFBIG) instead
    m = re.match(r"([A-Za-z_][\w.]*)(:|$)", lines[-1])  # "ExceptionType: message"
    return _EXCEPTION_KINDS.get(m.group(1).rsplit(".", 1)[-1] if m else "", "runtime_error")


def check_completion(problem: dict, completion: str, slot: int = 0, timeout: float = 10.0,
                     memory_mb: int = 2048, max_tests: int | None = None, **sandbox) -> dict:
    """Run a completion against its problem's tests -> {passed, error, detail, runtime}."""
    if "io_tests" not in problem:
        # The program prints a random token as its very last act, so one that leaves early with
        # sys.exit(0) / os._exit(0) before the asserts ran does not pass.
        nonce = secrets.token_hex(8)
        source = problem["head"] + completion + problem["tail"] + f"\nprint({nonce!r})\n"
        run = run_program(source, timeout=timeout, memory_mb=memory_mb, slot=slot, **sandbox)
        kind = error_kind(run)
        if kind is None and not run["stdout"].rstrip().endswith(nonce):
            kind = "early_exit"
        detail = run["stderr"].strip().splitlines()[-1][:500] if kind and run["stderr"].strip() else ""
        return {"passed": kind is None, "error": kind, "detail": detail, "runtime": round(run["runtime"], 4)}
    limit = problem.get("time_limit") or timeout
    total = 0.0
    tests = problem["io_tests"][:max_tests] if max_tests else problem["io_tests"]
    for i, (stdin, expected) in enumerate(tests):
        run = run_program(completion, stdin=stdin, timeout=limit, memory_mb=memory_mb, slot=slot, **sandbox)
        total += run["runtime"]
        kind = error_kind(run)
        # Whitespace-insensitive comparison, token by token, as competitive-programming judges do.
        if kind is None and run["stdout"].split() != expected.split():
            return {"passed": False, "error": "wrong_answer", "runtime": round(total, 4),
                    "detail": f"test {i}: expected {expected[:200]!r}, got {run['stdout'][:200]!r}"}
        if kind:
            detail = f"test {i}: " + (run["stderr"].strip().splitlines() or [""])[-1][:500]
            return {"passed": False, "error": kind, "detail": detail, "runtime": round(total, 4)}
    return {"passed": True, "error": None, "detail": "", "runtime": round(total, 4)}


def check_all(jobs: list[tuple[dict, str]], workers: int, **kwargs) -> list[dict]:
    """check_completion over (problem, completion) pairs with `workers` threads (each waits on
    its own subprocess, so threads are enough); each running program holds one sandbox slot."""
    workers = max(1, min(workers, MAX_WORKERS - 1))  # the last slot is the interpreter probe's
    if not kwargs.get("python"):  # probe once here, not in every thread at the same time
        kwargs["python"] = sandbox_python(kwargs.get("drop_privileges", DROP_PRIVILEGES), None)
    slots = queue.SimpleQueue()
    for s in range(workers):
        slots.put(s)

    def work(job):
        slot = slots.get()
        try:
            return check_completion(*job, slot=slot, **kwargs)
        finally:
            slots.put(slot)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, jobs))
