"""
sandbox_server.py — the sandbox's fork server: what runs as `python -s sandbox_server.py --serve CONFIG`,
one per worker slot, root when we are. sandbox.py (the evaluator's side: `run_program`, the
verdicts, `check_all`) starts it and talks to it; read that file first.

It imports nothing of the project, only the standard library: it runs as a script, in a
scrubbed environment, with the repository taken off sys.path, under whichever interpreter runs
the programs (a system python3 where the sandbox uid cannot run ours: see sandbox_python).

Read top to bottom:
  1. Settings: the Linux namespaces and the fallback where the kernel refuses them, the verdict
     (the nonce), what the server preimports, the flags of the system calls.
  2. /proc helpers: finding, counting and removing what a uid left behind.
  3. System calls Python does not wrap (unshare, setns, mount, prctl) and the fd-passing pipe
     (`send`, `recv`: the evaluator's side uses them too).
  4. The fork server: serve, prepare, init (pid 1 of the program's namespaces), become the
     program, run it, supervise it, sweep its leftovers.

Names without a leading underscore (`processes`, `rmtree`, `send`, `recv`, `drain`, `LINUX`,
`WORLD_WRITABLE_DIRS`) are what sandbox.py uses; the rest runs only in the server, in I and in P.
"""
from __future__ import annotations

import array
import ctypes
import gc
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time

# ---- 1. settings: namespaces, the verdict, preimports, system-call flags ---------------------------

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
# The verdict (sandbox.check_completion): a program "completed" when the runner's code *after* runpy
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

LINUX = sys.platform.startswith("linux")
WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
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

# ---- 2. /proc helpers (Linux; elsewhere they find nothing) -----------------------------------------

def processes(uid=None, marker=None) -> list[int]:
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


def rmtree(root: str):
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



def send(sock, obj, fds=()):
    """A length-prefixed JSON message on the control socket, with `fds` passed along (SCM_RIGHTS)."""
    data = json.dumps(obj).encode()
    data = struct.pack("<Q", len(data)) + data
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
    if sent < len(data):
        sock.sendall(data[sent:])


def recv(sock):
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


# ---- 4. the fork server: serve, prepare, init, become the program, supervise, sweep ------------------

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
    send(ctl, {"pid": os.getpid(), "namespaces": state["pidns_fd"] is not None,
                "userns": state["userns"], "why": state["why"]})
    gc.freeze()  # what we imported stays shared with the children instead of being copied
    while True:
        req, fds = recv(ctl)
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
        send(ctl, _supervise(pid, start, job, state))


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
    no os._exit, no signal -- does the nonce reach the verdict pipe (see "The verdict" in section 1)."""
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
    verdict = drain(job["verdict_r"])
    for fd in (job["verdict_r"], job["status_r"]):
        os.close(fd)
    rmtree(job["scratch"])
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


def drain(fd: int, blocking: bool = False, limit: int = 1 << 16) -> bytes:
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
        pids = [p for p in processes(marker=marker) if p not in ours]
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



if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _run_untrusted(_serve(json.loads(sys.argv[2])))  # returns only in a program's own process, P
