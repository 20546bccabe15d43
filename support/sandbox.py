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

Read top to bottom:
  1. Settings: limits, the sandbox uids, which interpreter runs programs.
  2. /proc helpers: finding, counting and removing what a uid left behind.
  3. System calls Python does not wrap (unshare, setns, mount, prctl) and the fd-passing pipe.
  4. The fork server: serve, prepare, init (pid 1 of the program's namespaces), become the
     program, supervise it, sweep its leftovers.
  5. The evaluator's side: one server per worker slot, `run_program`, the verdict
     (`check_completion`, `error_kind`), `check_all` in parallel, and `benchmark`.

How a program runs (the design; details at each function):

  evaluator thread --json over a pipe--> fork server S (one per worker slot, started once:
  `python -s sandbox.py --serve`, our code only, a scrubbed environment, the common stdlib
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
without tearing its modules down (see _run_untrusted).
"""
from __future__ import annotations

import array
import concurrent.futures
import ctypes
import errno
import functools
import gc
import json
import math
import os
import queue
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

# ---- 1. settings: limits, uids, the interpreter that runs programs ---------------------------------

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
# us; there the PID namespace (below) is what keeps the evaluator out of its reach.
#
# Linux namespaces, where the kernel allows them (root, or an unprivileged user namespace):
#   - network: each fork server lives in a network namespace of its own, with nothing in it (not
#     even loopback up), so no program can reach any address -- 127.0.0.1 of the evaluator
#     included. (One per slot, not per program: creating and tearing down a network namespace
#     costs ~3 ms; programs of one slot run one after another and leave nothing behind.)
#   - PID: each program gets a fresh PID namespace whose init is our I process. The program sees
#     no process outside it (getppid() is 1, kill(-1) reaches only its own), and when I exits the
#     kernel kills everything left in the namespace -- double-forked daemons included -- before
#     we even look.
#   - mount + IPC: each program gets its own /tmp, /var/tmp, /dev/shm, /run/lock (size-capped
#     tmpfs, gone with the namespace), its own /proc (showing only its namespace), its own SysV
#     IPC objects.
# Where the kernel refuses (a container without CAP_SYS_ADMIN, a seccomp profile), the server
# says so once, with the reason, and programs run as before: own uid as root, leftovers swept by
# uid (root) or by a marker in their environment (not root).
#
# The verdict (check_completion): a program "completed" when the runner's code *after* runpy
# returned normally writes a random nonce to an inherited pipe that only the fork server reads.
# The nonce is never in the program's source, file, argv or environment (the old design appended
# `print(nonce)` to the source, so a program could read its own file, print the nonce and
# os._exit(0) before the asserts: a wrong solution passed). sys.exit / os._exit / a fatal signal
# before the end means no nonce, hence "early_exit". What this cannot stop, and nothing inside
# one Python process can: code that runs *in the same interpreter* as the tests can dig the
# nonce out of the runner's frame (sys._getframe, gc) -- the same power that lets it beat the
# asserts themselves (an object whose __eq__ is always True, a trace function jumping over an
# assert). So the pass signal is now exactly as strong as the tests, no weaker: forging it
# takes an attack on the harness's memory, not reading a file. Deciding pass/fail outside the
# program's process would need the tests' comparisons moved out too (expected values the
# program never sees), which HumanEval's `check(candidate)` format does not allow.

# uids 0x78000000 + pid*64 + slot: above the ranges that sssd/LDAP and systemd hand out, below
# 2^31 (some tools treat uid_t as signed); derived from our pid so that two eval.py processes
# on one machine (torchrun ranks) never share one, since a sweep kills everything of its uid.
SANDBOX_UID_BASE = 0x78000000
MAX_WORKERS = 64
LINUX = sys.platform.startswith("linux")
DROP_PRIVILEGES = LINUX and os.geteuid() == 0
WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
TMPFS_MB = 256  # size cap of each private tmpfs (/tmp, /var/tmp, /dev/shm, /run/lock; scratch is in /tmp)
# Imported once in the fork server, so that programs do not pay for them (what HumanEval, MBPP and
# CodeContests solutions import most). Importing is side-effect free for all of them except
# `random`'s seed, which the random module itself re-seeds in every forked child.
PREIMPORTS = ("array", "bisect", "cmath", "collections", "copy", "datetime", "decimal", "fractions",
              "functools", "hashlib", "heapq", "itertools", "json", "math", "operator", "random", "re",
              "statistics", "string", "sys", "textwrap", "typing")

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
VERDICT_FD, SETUP_OK_FD = 3, 4  # in the program's process (stdin/out/err are 0-2)


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


# ---- 2. /proc helpers (Linux; elsewhere they find nothing) -----------------------------------------

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


def _remove_files_of(uid: int, dirs):
    """Delete what `uid` created in the world-writable directories: the only places outside its
    scratch directory where an unprivileged uid can create files. (Only their top level.)"""
    for d in set(dirs):
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


# ---- 3. system calls Python does not wrap (3.12 has os.unshare / os.setns) -----------------------

_libc = None


def _sys(name: str, *args):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}: {os.strerror(e)}")


def _unshare(flags: int):
    os.unshare(flags) if hasattr(os, "unshare") else _sys("unshare", flags)


def _setns(fd: int, nstype: int):
    os.setns(fd, nstype) if hasattr(os, "setns") else _sys("setns", fd, nstype)


def _mount(source, target: str, fstype, flags: int, data=None):
    def enc(s):
        return s.encode() if isinstance(s, str) else s
    _sys("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def _prctl(option: int, arg: int):
    _sys("prctl", option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def _drop_capabilities():
    """capset(all empty): for a program that is root only inside our user namespace."""
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    _sys("capset", ctypes.c_char_p(header), ctypes.c_char_p(bytes(24)))


def _anon_file(name: str) -> int:
    """An fd on an anonymous file: no path, nothing to clean up, not inherited across exec."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create(name)
    f = tempfile.TemporaryFile()
    fd = os.dup(f.fileno())
    f.close()
    return fd


def _send(sock, obj, fds=()):
    """A length-prefixed JSON message on the control socket, with `fds` passed along (SCM_RIGHTS)."""
    data = json.dumps(obj).encode()
    data = struct.pack("<Q", len(data)) + data
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv(sock):
    """-> (message, [fds]), or (None, []) once the other end is gone."""
    fds = array.array("i")
    head, ancdata, _, _ = sock.recvmsg(8, socket.CMSG_SPACE(16 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    while head and len(head) < 8:
        more = sock.recv(8 - len(head))
        if not more:
            head = b""
        head += more
    if len(head) < 8:
        return None, list(fds)
    n, chunks = struct.unpack("<Q", head)[0], []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            return None, list(fds)
        chunks.append(chunk)
        n -= len(chunk)
    return json.loads(b"".join(chunks)), list(fds)


# ---- 4. the fork server (runs as `python -s sandbox.py --serve CONFIG`, root when we are) ----------

def _serve(cfg: dict) -> dict:
    """The fork server's loop: one request (a program) at a time from the evaluator thread that
    owns this slot, one result back. Returns only in a program's own process (P), with its job;
    the server and I never return."""
    if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # nothing of the repository's (an eval.py, a data.py) shadows what programs import
    ctl = socket.socket(fileno=cfg["ctl_fd"])  # to the evaluator; our stdin and stdout are /dev/null
    for name in (*PREIMPORTS, "fcntl", "pkgutil", "resource", "runpy"):  # the last four: P's set-up
        try:
            __import__(name)
        except ImportError:
            pass
    # The environment we were started with is exactly the programs' (see _environment).
    state = {"uid": cfg["uid"], "userns": False, "pidns_fd": None, "why": "", "env": dict(os.environ)}
    if cfg["namespaces"] and LINUX:
        try:
            _enter_server_namespaces(state)
        except OSError as e:
            state["why"] = str(e)
    if LINUX:
        # Orphans of a program (only possible without a PID namespace) are re-parented to us, not
        # to the machine's init, so that we can reap them after the sweep.
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _send(ctl, {"pid": os.getpid(), "namespaces": state["pidns_fd"] is not None,
                "userns": state["userns"], "why": state["why"]})
    gc.freeze()  # what we imported stays shared with the children instead of being copied
    while True:
        req, fds = _recv(ctl)
        if req is None:  # the evaluator closed the socket (finished, or died)
            os._exit(0)
        job = _prepare(req, fds, cfg, state, ctl.fileno())
        use_pidns = False
        if state["pidns_fd"] is not None:
            try:
                # The next child becomes pid 1 of a fresh PID namespace. setns back to our own
                # first: a process can unshare(CLONE_NEWPID) only while its children's namespace
                # is its own.
                _setns(state["pidns_fd"], CLONE_NEWPID)
                _unshare(CLONE_NEWPID)
                use_pidns = True
            except OSError as e:
                job["why"] = f"PID namespace refused for this program ({e})"
        job["pidns"] = use_pidns
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            return _init(job)  # I; returns only in P
        _send(ctl, _supervise(pid, start, job, state))


def _enter_server_namespaces(state: dict):
    """Once per server: a network namespace of our own (so also every program's), and a handle on
    the PID namespace under which each program gets a fresh one. Not root: first an unprivileged
    user namespace (we are its root, mapped to our own uid outside), and a PID namespace in it
    whose init is the server from now on -- so no program, not even one running as our uid, can
    name the evaluator's pid, let alone signal it."""
    if os.geteuid() == 0:
        _unshare(CLONE_NEWNET)
    else:
        uid, gid = os.getuid(), os.getgid()
        _unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET)
        try:  # past this point there is no way back: a failure ends the server, loudly
            for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                               ("/proc/self/gid_map", f"0 {gid} 1")):
                with open(path, "w") as f:
                    f.write(text)
        except OSError as e:
            raise RuntimeError(f"sandbox: cannot map our uid into the user namespace: {e}") from e
        state["userns"] = True
        pid = os.fork()
        if pid:  # the outer process only waits for the server, which is pid 1 of the namespace
            _, status = os.waitpid(pid, 0)
            os._exit(_exitcode(status) & 0xFF)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    state["pidns_fd"] = os.open("/proc/self/ns/pid", os.O_RDONLY)


def _prepare(req: dict, fds: list, cfg: dict, state: dict, ctl: int) -> dict:
    """The fds, directory and nonce of one program (in the server, before the fork). The program's
    source, stdin, stdout and stderr are anonymous files that the evaluator made and passed to us
    (`fds`): we hand them on to I and P and never read them, so no program's data ever enters our
    memory -- which every later program inherits by fork."""
    # Created by I: inside the private /tmp where there is one, so nothing appears on the host.
    scratch = os.path.join(cfg["tmpdir"], f"{cfg['scratch_prefix']}{secrets.token_hex(6)}")
    job = dict(req, scratch=scratch, nonce=secrets.token_hex(16), ctl=ctl, why="", uid=state["uid"],
               userns=state["userns"], tmpdir=cfg["tmpdir"], env=dict(state["env"], HOME=scratch, TMPDIR=scratch),
               src=fds[0], out=fds[1], err=fds[2], inp=fds[3] if len(fds) > 3 else None)
    job["verdict_r"], job["verdict_w"] = os.pipe()
    job["status_r"], job["status_w"] = os.pipe()
    job["pidns_fd"] = state["pidns_fd"]
    uid = state["uid"]
    if uid is not None:
        job["nproc"] = req["max_procs"]
    elif state["userns"] and _kernel() >= (5, 14):
        # counted per (user namespace, uid) since Linux 5.14: the outer server process, the
        # server, I, then P's own
        job["nproc"] = req["max_procs"] + 3
    else:  # counted against all of our own processes: allow ours + max_procs (-1: no /proc, no cap)
        job["nproc"] = _task_count(os.getuid()) + req["max_procs"] if os.path.isdir("/proc") else -1
    return job


def _exitcode(status: int) -> int:
    """As subprocess reports it: the exit code, or -N for death by signal N (os.waitstatus_to_exitcode
    needs Python 3.9; the interpreter that runs programs may be a system python3 older than ours)."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _kernel() -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])


def _init(job: dict) -> dict:
    """I: pid 1 of the program's PID namespace (or, without one, just its trusted parent). Sets
    up the private mounts, writes the program, forks P, reaps until P exits, reports P's status
    to the server and exits -- which makes the kernel kill whatever is left in the namespace."""
    flags, note = 0, b""
    try:
        if LINUX:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the server died: so do we, and the namespace
        for fd in (job["ctl"], job["verdict_r"], job["status_r"], job["pidns_fd"]):
            if fd is not None:
                os.close(fd)
        if job["pidns"]:
            try:
                flags |= _private_mounts(job)
                os.makedirs(os.path.dirname(job["scratch"]), exist_ok=True)  # TMPDIR below /tmp
            except OSError as e:
                note = f"private mounts refused ({e})".encode()
        os.mkdir(job["scratch"], mode=0o700)
        program = os.path.join(job["scratch"], "program.py")
        with open(job["src"], "rb", closefd=True) as src, open(program, "wb") as f:
            shutil.copyfileobj(src, f)
        if job["uid"] is not None:
            os.chown(job["scratch"], job["uid"], job["uid"])
            os.chown(program, job["uid"], job["uid"])
        setup_r, setup_w = os.pipe()
    except BaseException as e:
        os.write(job["status_w"], struct.pack("<iB", -1, flags) + f"I: {e!r}".encode())
        os._exit(1)
    if LINUX and not job["pidns"]:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # the program's orphans come to us, not to the machine's init
    pid = os.fork()
    if pid == 0:
        os.close(setup_r)
        _become_program(job, program, setup_w)
        return job
    os.close(setup_w)
    for fd in (job["out"], job["err"], job["inp"], job["verdict_w"]):
        if fd is not None:
            os.close(fd)
    while True:  # as init we also reap the program's orphans
        try:
            wpid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            status = -1
            break
        except InterruptedError:
            continue
        if wpid == pid:
            break
    if os.read(setup_r, 1) == b"1":
        flags |= 4
    if not job["pidns"] and job["uid"] is not None:
        # No namespace to take the leftovers down with us: kill them here, as their uid (this
        # saves the server a fork per program), reaping the orphans that came to us.
        try:
            flags |= 8 if _kill_uid(job["uid"]) else 0
        except OSError as e:
            note += f" sweep failed: {e!r}".encode()
    os.write(job["status_w"], struct.pack("<iB", status, flags) + note)
    os._exit(0)


def _private_mounts(job: dict) -> int:
    """In I: a mount and IPC namespace of the program's own; fresh tmpfs on the world-writable
    directories (the scratch directory ends up in the private /tmp); a /proc of the new PID
    namespace. Returns flags: 1 = private /tmp, 2 = own /proc."""
    _unshare(CLONE_NEWNS | CLONE_NEWIPC)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    for d in sorted({*WORLD_WRITABLE_DIRS, job["tmpdir"]}):  # a parent before what it hides
        if os.path.isdir(d) and not os.path.islink(d):
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={TMPFS_MB}m,mode=1777")
    flags = 1
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        flags |= 2
    except OSError:
        pass  # a container that masks parts of /proc refuses a fresh one; the host's stays
    return flags


def _become_program(job: dict, program: str, setup_w: int):
    """P, before any untrusted code: session, fds, privileges, limits, directory, environment."""
    try:
        import fcntl
        os.setsid()
        # stdin, stdout, stderr, then the verdict and set-up pipes (not passed on to exec'd
        # children): first out of the way (any of them may sit on 0-4), then into place.
        wanted = [job["inp"] if job["inp"] is not None else os.open(os.devnull, os.O_RDONLY),
                  job["out"], job["err"], job["verdict_w"], setup_w]
        wanted = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in wanted]
        for target, fd in enumerate(wanted):
            os.dup2(fd, target, inheritable=target < 3)
        os.closerange(SETUP_OK_FD + 1, 1 << 16)  # the server's pipes, I's status pipe, the originals
        if LINUX:
            _prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary or file capability can raise it again
        uid = job["uid"]
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)  # from root to a non-zero uid: every capability is dropped
        elif job["userns"]:
            _drop_capabilities()
        import resource
        for which, value in ((resource.RLIMIT_CPU, job["cpu_s"]), (resource.RLIMIT_AS, job["memory_mb"] << 20),
                             (resource.RLIMIT_FSIZE, job["max_output_mb"] << 20), (resource.RLIMIT_CORE, 0),
                             (resource.RLIMIT_NPROC, job["nproc"])):
            try:
                if value >= 0:
                    resource.setrlimit(which, (value, value))  # hard = soft: cannot be raised back
            except (ValueError, OSError):
                pass  # a limit the OS refuses (macOS and RLIMIT_AS) is skipped
        os.chdir(job["scratch"])
        os.environ.clear()
        os.environ.update(job["env"])
        tempfile.tempdir = None  # so that the program's tempfile follows its TMPDIR
        sys.argv = [program]
        sys.path.insert(0, "")  # as `python -c`: the current directory first
        os.write(SETUP_OK_FD, b"1")
        os.close(SETUP_OK_FD)
    except BaseException as e:
        os.write(2, f"sandbox: program set-up failed: {e!r}\n".encode())
        os._exit(1)


def _run_untrusted(job: dict):
    """P: run the program as __main__. Only if it returns normally -- no exception, no sys.exit,
    no os._exit, no signal -- does the nonce reach the verdict pipe (see the comment at the top)."""
    import runpy
    nonce = job.pop("nonce").encode()
    job.clear()
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        try:
            os.write(VERDICT_FD, nonce)
        except OSError:
            pass  # the program closed it: not a pass, but not our error either
        code = 0
    except SystemExit as e:  # as the interpreter treats an uncaught SystemExit
        code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    # What the interpreter does at exit -- join non-daemon threads, run atexit handlers, flush
    # stdout/stderr -- then leave without tearing the modules down, which takes a forked
    # interpreter ~15 ms and shows nothing but __del__ methods run at shutdown.
    if "threading" in sys.modules:
        try:
            sys.modules["threading"]._shutdown()
        except BaseException:
            sys.excepthook(*sys.exc_info())
    import atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            code = code or 120  # as the interpreter does when it cannot flush stdout
    os._exit(code & 0xFF if isinstance(code, int) else 1)


def _wait(pid: int, timeout: float) -> int | None:
    """Wait for our child `pid` up to `timeout` seconds -> its wait status, or None (still running)."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            fd = None
        if fd is not None:
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                deadline = time.monotonic() + timeout
                while not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    if time.monotonic() >= deadline:
                        return None
            finally:
                os.close(fd)
            return os.waitpid(pid, 0)[1]
    deadline, pause = time.monotonic() + timeout, 0.0005
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _supervise(pid: int, start: float, job: dict, state: dict) -> dict:
    """In the server: wait for I with the timeout, kill, sweep, collect the outputs -> result."""
    for fd in (job["verdict_w"], job["status_w"], job["src"], job["out"], job["err"], job["inp"]):
        if fd is not None:
            os.close(fd)
    status = _wait(pid, job["timeout"])
    timed_out = status is None
    if timed_out:
        os.kill(pid, signal.SIGKILL)  # I: with a PID namespace, this kills all of the program
        os.waitpid(pid, 0)
    runtime = time.monotonic() - start
    os.set_blocking(job["status_r"], False)
    try:
        report = os.read(job["status_r"], 4096)
    except BlockingIOError:
        report = b""
    p_status, flags = struct.unpack("<iB", report[:5]) if len(report) >= 5 else (None, 0)
    clean = True
    if not job["pidns"] and not (flags & 8):
        # No PID namespace, and I did not sweep (timed out, or not root): the program's processes
        # may outlive I. Kill every process of its uid (root), or every one carrying our marker
        # (not root), then reap what was re-parented to us.
        clean = _sweep(state["uid"], state["env"]["WMTP_SANDBOX"])
    verdict = _drain(job["verdict_r"])
    for fd in (job["verdict_r"], job["status_r"]):
        os.close(fd)
    _rmtree(job["scratch"])
    if state["uid"] is not None and not flags & 1:  # no private /tmp: sweep the shared ones
        _remove_files_of(state["uid"], (*WORLD_WRITABLE_DIRS, job["tmpdir"]))
    if timed_out:
        returncode = -signal.SIGKILL
    elif p_status is None or p_status < 0:
        returncode = -signal.SIGKILL
    else:
        returncode = _exitcode(p_status)
    note = report[5:].decode(errors="replace")
    return {"returncode": returncode, "runtime": runtime, "timed_out": timed_out, "clean": clean,
            "completed": (not timed_out and verdict == job["nonce"].encode()),
            "isolation": {"pid_namespace": job["pidns"], "private_tmp": bool(flags & 1),
                          "own_proc": bool(flags & 2), "why": job["why"] or note},
            "setup_failed": not (timed_out or flags & 4 or p_status is None), "note": note}


def _drain(fd: int, blocking: bool = False, limit: int = 1 << 16) -> bytes:
    if not blocking:
        os.set_blocking(fd, False)
    elif limit <= 0:
        return b""
    chunks, n = [], 0
    while n < limit:
        try:
            chunk = os.read(fd, min(1 << 20, limit - n))
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        n += len(chunk)
    return b"".join(chunks)


def _sweep(uid: int | None, marker: str) -> bool:
    """Kill every process the program left behind; True once none is left. As root from a child
    that takes the program's uid: kill(-1) from inside the uid reaches every process of it in one
    atomic pass over the process table (a fork bomb cannot outrun it, as it could a pid-by-pid
    loop). Not root: by the marker in the environment, from /proc."""
    if uid is not None:
        sweeper = os.fork()
        if sweeper == 0:
            try:
                os._exit(0 if _kill_uid(uid) else 1)
            except BaseException:
                os._exit(2)
        clean = None
        while clean is None:  # reap the zombies re-parented to us, until the sweeper is done
            try:
                wpid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if wpid == sweeper:
                clean = _exitcode(status) == 0
        _reap()
        return bool(clean)
    ours = {int(os.readlink("/proc/self"))} if os.path.isdir("/proc") else set()  # as /proc numbers it
    if ours:
        with open("/proc/self/status") as f:  # the outer server process, in a user namespace
            ours.add(int(f.read().split("\nPPid:", 1)[1].split()[0]))
    for _ in range(200):
        pids = [p for p in _processes(marker=marker) if p not in ours]
        if not pids:
            _reap()
            return True
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        _reap()
        time.sleep(0.01)
    return False


def _kill_uid(uid: int) -> bool:
    """Become `uid` (for good: call it in a process that is about to exit) and kill every process
    of it; True once none is left. Is anything left? RLIMIT_NPROC answers without reading /proc:
    with the cap at 2, we (1) can fork only if no other process of the uid exists -- zombies
    included, so we reap those that are our children (orphans re-parented to a subreaper)."""
    import resource
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    resource.setrlimit(resource.RLIMIT_NPROC, (2, 2))
    for _ in range(2000):
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        _reap()
        try:
            probe = os.fork()
        except BlockingIOError:
            time.sleep(0.001)  # still some (or zombies that a parent has yet to reap)
            continue
        if probe == 0:
            os._exit(0)
        os.waitpid(probe, 0)
        return True
    return False


def _reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


# ---- 5. the evaluator's side -------------------------------------------------------------------------

class _Server:
    """One fork server: a long-lived `python -s sandbox.py --serve` (as root when we are)."""

    def __init__(self, python: str, uid: int | None, namespaces: bool):
        self.marker = secrets.token_hex(16)
        self.scratch = os.path.join(tempfile.gettempdir(), f"{scratch_prefix()}{self.marker[:8]}-")
        self.sock, theirs = socket.socketpair()
        cfg = {"uid": uid, "namespaces": namespaces, "tmpdir": tempfile.gettempdir(),
               "scratch_prefix": os.path.basename(self.scratch), "ctl_fd": theirs.fileno()}
        self.proc = subprocess.Popen(
            [python, "-s", os.path.abspath(__file__), "--serve", json.dumps(cfg)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), cwd="/",
            env=_environment(self.marker), start_new_session=True)  # Ctrl-C in the terminal reaches us, not it
        theirs.close()
        self.lock = threading.Lock()
        self.hello, _ = _recv(self.sock)
        if self.hello is None:
            self.proc.wait()
            raise RuntimeError(f"sandbox: the fork server ({python}) did not start (exit {self.proc.returncode})")

    def run(self, req: dict, fds: list) -> dict | None:
        with self.lock:
            try:
                _send(self.sock, req, fds)
                return _recv(self.sock)[0]
            except OSError:
                return None

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


def _server_pids() -> set[int]:
    return {s.hello["pid"] for s in _servers.values()} | {s.proc.pid for s in _servers.values()}


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
    `completed`: the program ran to its end and returned normally (see the comment at the top).
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
        stdout = _drain(out, blocking=True, limit=(max_output_mb << 20) + 1)
        size = os.lseek(err, 0, os.SEEK_END)
        os.lseek(err, max(0, size - 8192), os.SEEK_SET)  # the end of a traceback says what went wrong
        stderr = _drain(err, blocking=True, limit=8192).decode("utf-8", "replace")
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
            pids = _processes(marker=server.marker)
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
            _rmtree(d)
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
    pids = []
    for s in list(_servers.values()):
        pids.append(s.proc.pid)
        try:
            with open(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return pids


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


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _run_untrusted(_serve(json.loads(sys.argv[2])))  # returns only in a program's process, P
