"""MLflow the way a team uses it: a real `mlflow server` (SQLite backend) whose artifacts
live on an S3 API server (moto's standalone server), both started here on 127.0.0.1 free ports
and killed at the end; the model registry; eval.py on `models:/NAME/VERSION`; a tracking server
that is closed, silent or killed mid-run (training goes on, warns once, keeps its metrics); and
the token-weight pages (viz.py). The tests that need the servers share one pair (module scope).

Users point the same settings at MinIO or AWS S3: MLFLOW_S3_ENDPOINT_URL + AWS credentials on
the server (proxied artifacts) or on the clients (an experiment whose artifact location is s3://).
"""
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from conftest import char_tokenizer, counting_jsonl, tiny_model_json

import common
import data
import mtp
from support import config, model_io, tracking, viz

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "wmtp"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# ---- servers: started here, on 127.0.0.1 free ports, bounded in time, killed at the end ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """This process's environment without any MLflow or AWS setting (a client that has no S3
    credentials really has none), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false", **extra}


@contextlib.contextmanager
def server(cmd, url, log, env, timeout=180):
    """Start `cmd` in its own session; wait until `url` answers; kill its whole group at the end."""
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if p.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{cmd[:4]} did not come up within {timeout}s:\n" + open(log).read()[-3000:]) from None
                time.sleep(0.3)
        yield p
    finally:
        kill_group(p)


def kill_group(p, sig=signal.SIGTERM):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)
    try:
        p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=15)


def mlflow_server(tmp, artifacts, env):
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp}/server.db", "--artifacts-destination", artifacts]
    return server(cmd, f"http://127.0.0.1:{port}/health", tmp / "mlflow-server.log", env), f"http://127.0.0.1:{port}"


def moto_command():
    if importlib.util.find_spec("moto") and importlib.util.find_spec("flask"):
        return [sys.executable, "-m", "moto.server"]
    for path in (os.path.join(os.path.dirname(sys.executable), "moto_server"), "moto_server"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([path, "--help"], capture_output=True, timeout=60, check=True)
            return [path]
    return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """moto's S3 server + `mlflow server --artifacts-destination s3://wmtp/proxied`."""
    missing = [m for m in ("boto3",) if importlib.util.find_spec(m) is None]
    moto = moto_command()
    if missing or moto is None:
        pytest.skip(f"needs boto3 and moto's S3 server (missing: {missing + ([] if moto else ['moto[server]'])}): "
                    "pip install boto3 'moto[server]' (both in requirements.txt)")
    import boto3
    tmp = tmp_path_factory.mktemp("stack")
    s3_port = free_port()
    s3_url = f"http://127.0.0.1:{s3_port}"
    with server(moto + ["-H", "127.0.0.1", "-p", str(s3_port)], s3_url, tmp / "moto.log", clean_env()):
        s3 = boto3.client("s3", endpoint_url=s3_url, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        srv, uri = mlflow_server(tmp, f"s3://{BUCKET}/proxied", clean_env(MLFLOW_S3_ENDPOINT_URL=s3_url, **S3_KEYS))
        with srv as process:
            yield {"tmp": tmp, "uri": uri, "s3": s3, "s3_url": s3_url, "server": process}


# ---- a tiny training run, as a subprocess ----

def tiny_config(tmp, **mlflow) -> str:
    char_tokenizer(tmp / "tok")
    model_json = tiny_model_json(tmp / "model.json")
    train, held_out = counting_jsonl(tmp / "train.jsonl", 32, seed=0), counting_jsonl(tmp / "eval.jsonl", 4, seed=1)
    cfg = tmp / "run.yaml"
    cfg.write_text(f"""
model: {{policy: {model_json}, tokenizer: {tmp / 'tok'}, n_heads: 2}}
data: {{source: jsonl, path: {train}, eval_path: {held_out}, max_seq_len: 64}}
train: {{max_steps: 3, global_batch: 4, micro_batch: 4, lr: 1.0e-2, warmup_steps: 1, eval_every: 2,
         device: cpu, out_dir: {tmp / 'out'}}}
mlflow: {json.dumps(mlflow)}
""")
    return str(cfg)


def train(cfg, *args, env, timeout=400):
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.join(REPO, "train_rho1.py"), cfg, *args], cwd=os.path.dirname(cfg),
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p, time.time() - t0


@pytest.fixture(scope="module")
def trained(stack, tmp_path_factory):
    """A run against the shared server: the tracking URI from MLFLOW_TRACKING_URI (the MLflow
    convention), the client without any S3 credentials (artifacts go through the server)."""
    tmp = tmp_path_factory.mktemp("stack")
    cfg = tiny_config(tmp, experiment="stack", run_name="tiny", registered_model="tiny-wmtp")
    p, _ = train(cfg, env=clean_env(MLFLOW_TRACKING_URI=stack["uri"]))
    return tmp, p


def test_run_on_a_shared_server_with_s3_artifacts(stack, trained):
    import mlflow
    import yaml
    from mlflow import MlflowClient
    tmp, p = trained
    client = MlflowClient(stack["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("stack").experiment_id])
    run_id = run.info.run_id
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params["rho1.ratio"] == "0.7" and run.data.params["model.n_heads"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/head1_ce")) == [0, 2, 3]
    # the resolved config, as a YAML artifact
    config = yaml.safe_load(open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml",
                                                                     dst_path=str(tmp), tracking_uri=stack["uri"])))
    assert config["train"]["max_steps"] == 3 and config["mlflow"]["registered_model"] == "tiny-wmtp"
    # the export names its run; the registry has it as a version with the run's tags
    final = tmp / "out" / "final"
    assert json.load(open(final / "mtp_config.json"))["mlflow_run_id"] == run_id
    v = client.get_model_version("tiny-wmtp", "1")
    assert (v.source, v.run_id) == (f"runs:/{run_id}/final", run_id)
    assert v.tags["n_heads"] == "2" and v.tags["steps"] == "3" and v.tags["weighting"].startswith("rho1 ratio=0.7")
    assert v.tags["base_model"].endswith("model.json") and v.tags["data"].startswith("jsonl:")
    assert "registered models:/tiny-wmtp/1" in p.stdout
    # the token-weight pages of every held-out evaluation (steps 0, 2 and the final 3)
    pages = {a.path for a in client.list_artifacts(run_id, "token_weights")}
    assert pages == {f"token_weights/step_00000{s}.{ext}" for s in (0, 2, 3) for ext in ("html", "png")}
    # the bytes in the bucket are the export's: the server wrote them to S3, the client had no keys
    prefix = f"proxied/{run.info.experiment_id}/{run_id}/artifacts/"
    keys = {o["Key"] for o in stack["s3"].list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert {prefix + "config.yaml", prefix + "final/mtp_heads.safetensors", prefix + "token_weights/step_000003.html"} <= keys
    for name in ("mtp_heads.safetensors", "model.safetensors", "mtp_config.json"):
        body = stack["s3"].get_object(Bucket=BUCKET, Key=prefix + "final/" + name)["Body"].read()
        assert body == (final / name).read_bytes(), name


def test_eval_on_a_registered_version(stack, trained, tmp_path):
    """eval.py models:/NAME/1 downloads the version, evaluates it, logs its own run tagged with
    the training run, and writes pass@k onto the version."""
    from mlflow import MlflowClient
    out = tmp_path / "eval"
    p = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), "models:/tiny-wmtp/1", "--task=humaneval",
                        "--limit=2", "--n_samples=1", "--temperature=0", "--max_new_tokens=4", "--workers=1",
                        f"--out={out}"], cwd=tmp_path, env=clean_env(MLFLOW_TRACKING_URI=stack["uri"]),
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.load(open(out / "results.json"))
    assert results["n_problems"] == 2 and results["n_heads"] == 2 and results["model"] == "models:/tiny-wmtp/1"
    client = MlflowClient(stack["uri"])
    (train_run,) = client.search_runs([client.get_experiment_by_name("stack").experiment_id])
    (run,) = client.search_runs([client.get_experiment_by_name("wmtp-eval").experiment_id])
    assert run.data.tags["training_run_id"] == train_run.info.run_id
    assert run.data.metrics["pass_at_1"] == results["pass@1"]
    assert {"results.json", "samples.jsonl"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert client.get_model_version("tiny-wmtp", "1").tags["eval/humaneval/pass_at_1"] == str(results["pass@1"])


def test_artifacts_straight_to_s3(stack, tmp_path):
    """An experiment whose artifact location is s3://...: the client writes to S3 itself
    (MLFLOW_S3_ENDPOINT_URL + credentials), the server only tracks."""
    from mlflow import MlflowClient
    cfg = tiny_config(tmp_path, experiment="direct", artifact_location=f"s3://{BUCKET}/direct", weight_pages=0)
    train(cfg, "--max_steps=1", f"--mlflow.tracking_uri={stack['uri']}",
          env=clean_env(MLFLOW_S3_ENDPOINT_URL=stack["s3_url"], **S3_KEYS))
    client = MlflowClient(stack["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("direct").experiment_id])
    assert run.info.artifact_uri == f"s3://{BUCKET}/direct/{run.info.run_id}/artifacts"
    key = f"direct/{run.info.run_id}/artifacts/final/mtp_heads.safetensors"
    body = stack["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == (tmp_path / "out" / "final" / "mtp_heads.safetensors").read_bytes()
    assert client.get_model_version("direct", "1").source == f"runs:/{run.info.run_id}/final"


@pytest.mark.parametrize("max_mb", [0.001, 1024.0], ids=["above-the-limit", "local-store"])
def test_large_export_is_registered_by_reference(tmp_path, max_mb):
    """Above mlflow.log_artifacts_max_mb, and always in a local store (a copy under ./mlruns would
    only double the disk), the weights stay where they are: the run's `final` holds the small
    files and export_ref.json, and models:/NAME/1 resolves to the export's path."""
    import mlflow
    old_uri = mlflow.get_tracking_uri()
    export = tmp_path / "out" / "final"
    export.mkdir(parents=True)
    (export / model_io.MTP_CONFIG).write_text('{"n_heads": 2}')
    (export / "tokenizer.json").write_text("{}")
    (export / "model.safetensors").write_bytes(bytes(4096))
    mcfg = tracking.MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="big",
                                 artifact_location=(tmp_path / "mlruns").as_uri(), log_artifacts_max_mb=max_mb)
    try:
        run = tracking.start_mlflow(mcfg, config.parse_config(common.TrainConfig, []), True, local_dir=str(export.parent))
        run.set_model_tags(n_heads=2)
        run.log_export(str(export))
        run.end()
        client = mlflow.MlflowClient(mcfg.tracking_uri)
        assert {a.path for a in client.list_artifacts(run.run_id, "final")} == {
            "final/export_ref.json", "final/tokenizer.json", f"final/{model_io.MTP_CONFIG}"}
        assert client.get_model_version("big", "1").tags == {"n_heads": "2"}
        assert not list((tmp_path / "mlruns").rglob("*.safetensors"))  # nothing copied
        with tracking.mlflow_model("models:/big/1", mcfg) as path:
            assert path == str(export)
        export.rename(tmp_path / "moved")
        with pytest.raises(FileNotFoundError, match="registered by reference"), tracking.mlflow_model("models:/big/1", mcfg):
            pass
    finally:
        mlflow.set_tracking_uri(old_uri)


# ---- the tracking server closed or silent: training goes on ----

def offline_records(out_dir):
    with open(os.path.join(out_dir, tracking.OFFLINE_FILE)) as f:
        return [json.loads(line) for line in f]


def test_closed_port_trains_warns_once_and_exits_0(tmp_path):
    cfg = tiny_config(tmp_path)
    p, seconds = train(cfg, f"--mlflow.tracking_uri=http://127.0.0.1:{free_port()}", env=clean_env())
    assert p.stderr.count("warning: MLflow failed") == 1, p.stderr[-3000:]
    assert (tmp_path / "out" / "final" / "mtp_config.json").exists()
    assert seconds < 150, seconds  # was: ~4 min of retries, then a crash before the first step
    records = offline_records(tmp_path / "out")
    assert [r["step"] for r in records if "loss" in r.get("metrics", {})] == [1, 2, 3]
    assert any(r.get("params", {}).get("rho1.ratio") == 0.7 for r in records)
    # nothing lost: the kept records replay into a tracking store
    from mlflow import MlflowClient
    db = f"sqlite:///{tmp_path / 'replayed.db'}"
    run_id = tracking.replay_offline(str(tmp_path / "out" / tracking.OFFLINE_FILE), db)
    client = MlflowClient(db)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert client.get_run(run_id).data.params["rho1.ratio"] == "0.7"


def test_silent_server_costs_one_bounded_wait(tmp_path, monkeypatch, capsys):
    """A server that accepts connections and never answers: one timeout (the user's
    MLFLOW_HTTP_REQUEST_TIMEOUT, here 1 s), one warning, then no more waiting."""
    import mlflow
    old_uri = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        mcfg = tracking.MlflowConfig(tracking_uri=f"http://127.0.0.1:{silent.getsockname()[1]}", experiment="x")
        t0 = time.time()
        try:
            run = tracking.start_mlflow(mcfg, config.parse_config(common.TrainConfig, []), True, local_dir=str(tmp_path))
            for step in range(5):
                run.log_metrics({"loss": 1.0 / (step + 1)}, step)
            run.log_export(str(tmp_path))
            run.end()
        finally:
            mlflow.set_tracking_uri(old_uri)
        assert time.time() - t0 < 30
    assert capsys.readouterr().err.count("warning: MLflow failed") == 1
    assert [r["step"] for r in offline_records(tmp_path) if "metrics" in r] == [0, 1, 2, 3, 4]
    assert mlflow.active_run() is None


# ---- token-weight pages ----

def test_token_weight_page_shows_exactly_the_kept_tokens(tmp_path):
    """A hand-made example: per head, the excess loss of each completion token; Rho-1 (ρ = 0.5,
    the real mtp.rho1_weights) keeps the top half, and the page marks exactly those as kept."""
    tok = char_tokenizer(tmp_path / "tok")
    prompt, completion = "q:", "abcdef"
    ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    mask = [0] * len(prompt) + [1] * len(completion)
    batch = data.collate([(ids, mask)], pad_id=0)
    excess_by_token = {0: [0.1, 2.0, -1.0, 0.7, 1.5, 0.3],   # head 0 keeps tokens 1, 4, 3
                       1: [3.0, 0.2, 0.4, -0.5, 0.1, 0.9]}   # head 1 keeps tokens 0, 5, 2
    expected = {(0, 1), (0, 3), (0, 4), (1, 0), (1, 2), (1, 5)}
    T, n = batch["input_ids"].shape[1], 2
    excess = torch.zeros(n, 1, T)
    for k, values in excess_by_token.items():
        target = torch.zeros(1, T)
        target[0, len(prompt):len(prompt) + len(completion)] = torch.tensor(values)
        excess[k] = mtp.align_to_heads(target, n)[k]  # head k at position t: the excess of token t+k+1
    valid = mtp.align_to_heads(batch["loss_mask"], n)
    w = mtp.rho1_weights(excess, valid, 0.5, "hard")
    page = viz.rho1_page(tok, batch, excess, torch.zeros_like(excess), w, valid, "hard", "hand-made")
    html = viz.html(page)
    cells = re.findall(r'class="t (kept|dropped)" data-line="head(\d+)" data-pos="(\d+)"', html)
    assert {(int(k), int(i)) for cls, k, i in cells if cls == "kept"} == expected
    assert len(cells) == n * len(completion)  # every completion token once per head
    assert "excess = +2.000" in html  # the value on hover
    paths = viz.save(page, str(tmp_path / "pages"), "hand")
    assert [os.path.basename(p) for p in paths] == ["hand.html", "hand.png"]
    assert open(paths[1], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_critic_page_has_every_number_on_hover(tmp_path):
    tok = char_tokenizer(tmp_path / "tok")
    ids = tok("q:xyz", add_special_tokens=False)["input_ids"]
    batch = data.collate([(ids, [0, 0, 1, 1, 1], 1.0, 0)], pad_id=0)
    T = batch["input_ids"].shape[1]
    v = torch.linspace(0.2, 0.9, T)[None]
    d, a, w = v - 0.5, v - 0.4, torch.full((1, T), 2.5)
    html = viz.html(viz.critic_page(tok, batch, v, d, a, w, "critic"))
    for key in ("V", "delta", "A", "w"):
        assert len(re.findall(f'data-line="{key}" data-pos', html)) == 3, key
    assert f"V_t = {float(v[0, 4]):.3f}" in html and "w_t = 2.500" in html


# ---- last, because it ends the shared server ----

def test_server_killed_mid_run(stack, tmp_path):
    """The tracking server dies while training runs: training finishes and writes its export,
    warns once, and every step's metrics are either on the server (its SQLite file) or in the
    offline file. (The last test of this file: it kills the shared server.)"""
    from mlflow import MlflowClient
    cfg = tiny_config(tmp_path, experiment="killed")
    cmd = [sys.executable, os.path.join(REPO, "train_rho1.py"), cfg, "--max_steps=120", "--eval_every=0",
           f"--mlflow.tracking_uri={stack['uri']}"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        client, deadline, steps = MlflowClient(stack["uri"]), time.time() + 300, []
        while len(steps) < 2 and p.poll() is None and time.time() < deadline:
            time.sleep(0.2)
            with contextlib.suppress(Exception):
                (run,) = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
                steps = client.get_metric_history(run.info.run_id, "loss")
        assert len(steps) >= 2 and p.poll() is None, "the run ended before the server could be killed"
        kill_group(stack["server"], signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=400)
    finally:
        if p.poll() is None:
            kill_group(p, signal.SIGKILL)
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert stderr.count("warning: MLflow failed") == 1, stderr[-3000:]
    assert (tmp_path / "out" / "final" / "mtp_config.json").exists()
    db = MlflowClient(f"sqlite:///{stack['tmp']}/server.db")  # the dead server's own store
    (run,) = db.search_runs([db.get_experiment_by_name("killed").experiment_id])
    on_server = {m.step for m in db.get_metric_history(run.info.run_id, "loss")}
    kept = {r["step"] for r in offline_records(tmp_path / "out") if "loss" in r.get("metrics", {})}
    assert on_server and kept and on_server | kept == set(range(1, 121))
