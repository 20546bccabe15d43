"""
sandbox.py — run model-written Python programs, and the verdict on one completion.

    from support import sandbox
    sandbox.run_program("print(1)")                      # {returncode, stdout, stderr, runtime, completed, ...}
    sandbox.check_completion(problem, completion)         # {passed, error, detail, runtime}
    sandbox.check_all([(problem, completion), ...], workers=16, progress=True)
    sandbox.benchmark(n=200, workers=16)                  # programs/s vs bare `python -c pass`

A problem is a dict: {"head", "tail"} (the program is head + completion + tail: HumanEval, MBPP)
or {"io_tests": [(stdin, expected stdout), ...], "time_limit"} (CodeContests). eval.py (pass@k)
and data.py (labelling MBPP mutants for the critic's demo data) both execute programs here.
See README "Evaluation" for what the sandbox does and does not protect against.

This file is the evaluator's side. The fork server that actually runs each program -- namespaces,
privileges, limits, the verdict's nonce, the sweep of leftovers -- is sandbox_server.py, a script
of the standard library only.

Read top to bottom:
  1. Settings: what every program gets, the sandbox uids, which interpreter runs programs.
  2. The fork servers: one per worker slot (`_Server`, started once, kept), and `run_program`.
  3. The verdict (`error_kind`, `check_completion`), `check_all` in parallel, and `benchmark`.
Then sandbox_server.py: its settings (namespaces, the nonce), /proc helpers, system calls, and
serve / prepare / init / become the program / supervise / sweep.

How a program runs (the design; details at each function):

  evaluator thread --json over a pipe--> fork server S (one per worker slot, started once:
  `python -s sandbox_server.py --serve`, our code only, a scrubbed environment, the common stdlib
  modules imported) --fork--> I (pid 1 of a fresh PID namespace: private mounts, private /tmp,
  its own /proc; waits for P, reaps, reports P's exit status) --fork--> P (the program: new
  session, own uid, no groups, no new privileges, rlimits hard = soft, cwd = scratch, fresh
  environment, stdio on anonymous files) --runpy--> head + completion + tail.

Forking a warm interpreter replaces a ~14 ms (CPU) interpreter start per program by ~9 ms of
CPU for server, init and program together, namespaces included (`benchmark`, README). Every
property of the old one-interpreter-per-program design is kept: the child sets up its session,
uid, limits, directory and environment as the old launcher did, before any untrusted byte runs;
the server never reads program data (it passes file descriptors), so the memory each program
inherits holds nothing of another; the one difference is that the program's interpreter exits
without tearing its modules down (see sandbox_server._run_untrusted).
"""
from __future__ import annotations

import concurrent.futures
import errno
import functools
import json
import math
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from support import sandbox_server
from support.sandbox_server import LINUX, drain, processes, recv, rmtree, send

# ---- 1. settings: what every program gets, uids, the interpreter that runs programs -----------------

# Every program runs in its own process, in a new session, in a fresh scratch directory that is
# deleted afterwards, with an environment built from scratch (nothing of ours -- HF_TOKEN, AWS_*,
# API keys -- is passed on), stdin closed or fed from a file, stdout/stderr captured to anonymous
# files, a wall-clock timeout, and rlimits on CPU time, address space, file size and number of
# processes.
#
# RLIMIT_NPROC counts all processes of the *real uid* on the machine, and the kernel does not
# enforce it for root at all. So when we are root (GPU boxes and containers usually are), every
# concurrently running program gets its own otherwise unused uid: the cap then counts exactly
# that program's processes, the program cannot write to anything outside its scratch directory
# but world-writable directories, cannot read root's files or other processes' environments, and
# cannot signal the evaluator or its fork server (both root). Without root, the program runs as
# us; there the PID namespace is what keeps the evaluator out of its reach.
#
# Namespaces (network, PID, mount, IPC), the fallback where the kernel refuses them, and how the
# verdict's nonce works: sandbox_server.py, section 1.

# uids 0x78000000 + pid*64 + slot: above the ranges that sssd/LDAP and systemd hand out, below
# 2^31 (some tools treat uid_t as signed); derived from our pid so that two eval.py processes
# on one machine (torchrun ranks) never share one, since a sweep kills everything of its uid.
SANDBOX_UID_BASE = 0x78000000
MAX_WORKERS = 64
DROP_PRIVILEGES = LINUX and os.geteuid() == 0
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


def scratch_prefix() -> str:
    """Scratch directories are <tempdir>/<this><random>: ours are told apart from another
    evaluator's on the same machine."""
    return f"wmtp-sandbox-{os.getpid()}-"


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


# ---- 2. the fork servers, one per worker slot, and run_program ----------------------------------------

def _anon_file(name: str) -> int:
    """An fd on an anonymous file: no path, nothing to clean up, not inherited across exec."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create(name)
    f = tempfile.TemporaryFile()
    fd = os.dup(f.fileno())
    f.close()
    return fd


class _Server:
    """One fork server: a long-lived `python -s sandbox_server.py --serve` (as root when we are)."""

    def __init__(self, python: str, uid: int | None, namespaces: bool):
        self.marker = secrets.token_hex(16)
        self.scratch = os.path.join(tempfile.gettempdir(), f"{scratch_prefix()}{self.marker[:8]}-")
        self.sock, theirs = socket.socketpair()
        cfg = {"uid": uid, "namespaces": namespaces, "tmpdir": tempfile.gettempdir(),
               "scratch_prefix": os.path.basename(self.scratch), "ctl_fd": theirs.fileno()}
        self.proc = subprocess.Popen(
            [python, "-s", os.path.abspath(sandbox_server.__file__), "--serve", json.dumps(cfg)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), cwd="/",
            env=_environment(self.marker), start_new_session=True)  # Ctrl-C in the terminal reaches us, not it
        theirs.close()
        self.lock = threading.Lock()
        self.hello, _ = recv(self.sock)
        if self.hello is None:
            self.proc.wait()
            raise RuntimeError(f"sandbox: the fork server ({python}) did not start (exit {self.proc.returncode})")

    def run(self, req: dict, fds: list) -> dict | None:
        with self.lock:
            try:
                send(self.sock, req, fds)
                return recv(self.sock)[0]
            except OSError:
                return None

    def pids(self) -> list[int]:
        """The server's own processes: the one we started and, in a user namespace, the inner
        server (its only child; the pid in its hello is the one inside the namespace, 1)."""
        pids = [self.proc.pid]
        if self.hello["userns"]:
            try:
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                    pids += [int(p) for p in f.read().split()]
            except OSError:
                pass
        return pids

    def close(self):
        self.sock.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_servers: dict = {}
_servers_lock = threading.Lock()
_warned: set = set()


def _environment(marker: str) -> dict:
    """Everything a program's environment holds (plus HOME and TMPDIR = its scratch directory)."""
    return {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WMTP_SANDBOX": marker}


def _server(slot: int, python: str, drop_privileges: bool, namespaces: bool) -> _Server:
    key = (slot, python, drop_privileges, namespaces)  # run_program's key too
    with _servers_lock:
        server = _servers.get(key)
        if server is not None and server.proc.poll() is not None:
            server = None  # died (killed by a program, where nothing stops that): start another
        if server is None:
            if not _servers:
                import atexit
                atexit.register(shutdown)
            server = _servers[key] = _Server(python, sandbox_uid(slot) if drop_privileges else None, namespaces)
            why = server.hello["why"]
            if namespaces and why and why not in _warned:
                _warned.add(why)
                print(f"sandbox: WARNING: Linux namespaces refused ({why}): programs keep network access, "
                      f"share /tmp and /proc with the machine" + ("" if drop_privileges else
                      ", and can signal the evaluator (they run as you)") + "; see README 'The sandbox'",
                      file=sys.stderr)
        return server


def shutdown():
    """Stop every fork server (also registered with atexit)."""
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for s in servers:
        s.close()


def run_program(source: str, stdin: str | None = None, timeout: float = 10.0, memory_mb: int = 2048,
                max_procs: int = 8, max_output_mb: int = 64, slot: int = 0,
                drop_privileges: bool = DROP_PRIVILEGES, python: str | None = None,
                namespaces: bool = True) -> dict:
    """Run one Python program in the sandbox -> {returncode, stdout, stderr, runtime, timed_out,
    clean, completed, isolation}.

    `slot` (0..MAX_WORKERS-1) must be unique among programs running at the same time: it picks
    the fork server and the sandbox uid. `max_procs` counts processes and threads, the program's
    own included; the memory limit is per process, so a program can use up to max_procs *
    memory_mb in all. `clean` is False if some process of the program could not be killed.
    `completed`: the program ran to its end and returned normally (sandbox_server.py, "The verdict").
    `namespaces=False` skips the Linux namespaces (the fallback where the kernel refuses them).
    """
    python = python or sandbox_python(drop_privileges, None)
    req = {"timeout": timeout, "cpu_s": math.ceil(timeout) + 1, "memory_mb": memory_mb,
           "max_output_mb": max_output_mb, "max_procs": max_procs}
    key = (slot, python, drop_privileges, namespaces)
    server = _server(*key)
    files = [_anon_file("program"), _anon_file("stdout"), _anon_file("stderr")]
    try:
        os.write(files[0], source.encode("utf-8", "replace"))
        if stdin is not None:
            files.append(_anon_file("stdin"))
            os.write(files[3], stdin.encode("utf-8", "replace"))
        for fd in files:
            os.lseek(fd, 0, os.SEEK_SET)
        result = server.run(req, files)
        out, err = files[1], files[2]
        os.lseek(out, 0, os.SEEK_SET)  # the program's writes moved this file's (shared) offset
        stdout = drain(out, blocking=True, limit=(max_output_mb << 20) + 1)
        size = os.lseek(err, 0, os.SEEK_END)
        os.lseek(err, max(0, size - 8192), os.SEEK_SET)  # the end of a traceback says what went wrong
        stderr = drain(err, blocking=True, limit=8192).decode("utf-8", "replace")
    finally:
        for fd in files:
            os.close(fd)
    if result is None:
        # The server died under this program: only possible where nothing protects it (not root,
        # no namespaces). Count the program as crashed and carry on with a new server.
        with _servers_lock:
            if _servers.get(key) is server:
                del _servers[key]
        server.close()
        clean = False
        for _ in range(200):  # what is left of it carries the server's marker
            pids = processes(marker=server.marker)
            if not pids:
                clean = True
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.01)
        import glob
        for d in glob.glob(glob.escape(server.scratch) + "*"):
            rmtree(d)
        return {"returncode": 1, "stdout": "", "stderr": "sandbox: the program killed its runner",
                "runtime": 0.0, "timed_out": False, "clean": clean, "completed": False, "isolation": {}}
    note = result.pop("note")
    if result.pop("setup_failed"):
        raise RuntimeError(f"sandbox: setting up a program failed: {note or stderr[-500:]}")
    result.update(stdout=stdout.decode("utf-8", "replace"), stderr=stderr)
    why = result["isolation"].get("why")
    if why and why not in _warned:  # namespaces refused for this program only (the server has them)
        _warned.add(why)
        print(f"sandbox: WARNING: {why}", file=sys.stderr)
    if not result["clean"]:
        print(f"sandbox: WARNING: processes of slot {slot} survived SIGKILL", file=sys.stderr)
    return result


# ---- 3. the verdict, check_all in parallel, benchmark -------------------------------------------------

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
        # Passed = ran to the end (the tail's asserts included) and exited 0. Leaving early with
        # sys.exit(0) / os._exit(0) before the asserts ran is "early_exit": the runner's nonce,
        # written only after the program returned, never reached the verdict pipe.
        run = run_program(problem["head"] + completion + problem["tail"], timeout=timeout,
                          memory_mb=memory_mb, slot=slot, **sandbox)
        kind = error_kind(run)
        if kind is None and not run["completed"]:
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


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_all(jobs: list[tuple[dict, str]], workers: int | None = None, progress: bool = False,
              **kwargs) -> list[dict]:
    """check_completion over (problem, completion) pairs with `workers` threads (default: one per
    CPU); each thread owns one sandbox slot (fork server + uid) and waits on it, so threads are
    enough. `progress`: a tqdm bar on stderr (programs done / total, programs/s, ETA)."""
    workers = max(1, min(workers or default_workers(), MAX_WORKERS - 1))  # the last slot is the probe's
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

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="execute", unit="program", dynamic_ncols=True)
    results = [None] * len(jobs)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(work, job): i for i, job in enumerate(jobs)}
        for f in concurrent.futures.as_completed(futures):
            results[futures[f]] = f.result()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return results


def _cpu_seconds(pids) -> float:
    """CPU time (user + system, own + reaped children) of these processes, from /proc; 0 elsewhere."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _server_tree() -> list[int]:
    """The fork servers' pids, with the inner server of a user namespace (a child of the outer)."""
    return [pid for s in list(_servers.values()) for pid in s.pids()]


def benchmark(n: int = 200, workers: int | None = None, jobs: list | None = None, **sandbox_kwargs) -> dict:
    """Programs/s of N trivial programs through the sandbox (check_all of `pass`, every protection
    on) vs N bare `python -c pass` starts of the same interpreter, one at a time and with W
    workers, and the CPU time each costs (server + init + program, from /proc: unlike wall time,
    not inflated by other load on a shared machine); prints a table and returns it. The fork
    servers' start-up (once per slot and evaluation) is timed separately. `jobs`: (problem,
    completion) pairs that must all pass (e.g. HumanEval's canonical solutions), also timed with
    W workers: programs/s with real tests."""
    import resource
    workers = workers or default_workers()
    drop = sandbox_kwargs.get("drop_privileges", DROP_PRIVILEGES)
    python = sandbox_kwargs.pop("python", None) or sandbox_python(drop, None)
    trivial = ({"head": "", "tail": ""}, "pass")

    def measured(fn, cpu):
        t, c = time.perf_counter(), cpu()
        fn()
        return time.perf_counter() - t, cpu() - c

    def bare_cpu():
        u = resource.getrusage(resource.RUSAGE_CHILDREN)
        return u.ru_utime + u.ru_stime

    def bare(w):
        with concurrent.futures.ThreadPoolExecutor(w) as pool:
            list(pool.map(lambda _: subprocess.run([python, "-c", "pass"], check=True), range(n)))

    def sandboxed(w, count=n):
        verdicts = check_all([trivial] * count, w, python=python, **sandbox_kwargs)
        assert all(v["passed"] for v in verdicts), verdicts

    def sandbox_cpu():
        return _cpu_seconds(_server_tree())

    startup, _ = measured(lambda: sandboxed(workers, workers), sandbox_cpu)  # starts (and warms) every slot
    res = {"n": n, "workers": workers, "python": python, "separate_uid": drop, "server_startup_s": startup,
           "isolation": run_program("pass", python=python, **sandbox_kwargs)["isolation"]}
    print(f"# {n} trivial programs; {python}; separate uid: {drop}; isolation: {res['isolation']}")
    print(f"# {workers} fork servers started in {startup:.2f} s (once per evaluation, not counted below)")
    print(f"{'workers':>7} {'bare python -c pass /s':>23} {'sandbox programs /s':>20} {'time vs bare':>13}"
          f" {'CPU ms: bare':>13} {'sandbox':>8} {'ratio':>6}")
    for w in sorted({1, workers}):
        (tb, cb), (ts, cs) = measured(lambda w=w: bare(w), bare_cpu), measured(lambda w=w: sandboxed(w), sandbox_cpu)
        res[f"w{w}"] = {"bare_per_s": n / tb, "sandbox_per_s": n / ts, "time_ratio": ts / tb,
                        "bare_cpu_ms": 1000 * cb / n, "sandbox_cpu_ms": 1000 * cs / n,
                        "cpu_ratio": cs / cb if cb else float("nan")}
        r = res[f"w{w}"]
        print(f"{w:>7} {r['bare_per_s']:>23.1f} {r['sandbox_per_s']:>20.1f} {r['time_ratio']:>12.2f}x"
              f" {r['bare_cpu_ms']:>13.1f} {r['sandbox_cpu_ms']:>8.1f} {r['cpu_ratio']:>5.2f}x", flush=True)
    if jobs:
        t = time.perf_counter()
        verdicts = check_all(jobs, workers, python=python, **sandbox_kwargs)
        res["jobs_per_s"] = len(jobs) / (time.perf_counter() - t)
        res["jobs_failed"] = sum(not v["passed"] for v in verdicts)
        print(f"# {len(jobs)} given programs (their own tests included), {workers} workers: "
              f"{res['jobs_per_s']:.1f} programs/s, {res['jobs_failed']} failed")
    return res
