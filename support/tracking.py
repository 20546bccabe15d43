"""
tracking.py — MLflow for the training scripts and eval.py: a run that never stops or stalls the
work it tracks, the model registry, S3 artifacts, `models:/` and `runs:/` model specs.

    tracker = tracking.start_mlflow(cfg.mlflow, cfg, master)   # a Tracker (a no-op off rank 0)
    tracker.log_metrics({...}, step); tracker.log_export(final_dir); tracker.end()
    with tracking.mlflow_model("models:/wmtp/1", cfg.mlflow) as path: ...   # eval.py
    python -c "from support import tracking; tracking.replay_offline('out/run/mlflow_offline.jsonl')"

docs/mlflow.md has the shared-server set-up (tracking server + S3).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time

from support import model_io


@dataclasses.dataclass
class MlflowConfig:                  # the `mlflow:` section of every script's config (docs/mlflow.md)
    enabled: bool = True             # false: no MLflow at all (every call is a no-op)
    tracking_uri: str = ""           # "" = $MLFLOW_TRACKING_URI, else MLflow's default local store (./mlflow.db)
    experiment: str = "wmtp"         # MLflow experiment the run is logged under
    run_name: str = ""               # "" = MLflow's generated name
    artifact_location: str = ""      # where a *new* experiment keeps artifacts (s3://bucket/path: clients write
                                     # to S3 themselves); "" = the server's choice (beside a sqlite:/// file)
    register: bool = True            # log the final export as the run's artifact `final`, register a model version
    registered_model: str = ""       # the registry's name for it; "" = the experiment's name
    log_artifacts_max_mb: float = 1024.0  # a larger export is referenced by its path (weights not uploaded); in
                                     # a local store (./mlruns) every export is
    weight_pages: int = 3            # held-out examples drawn as token-weight pages (viz.py) at every held-out eval



def flatten_config(cfg, prefix="") -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out |= flatten_config(v, f"{prefix}{f.name}.")
        else:
            out[prefix + f.name] = v
    return out


def _mlflow():
    """The mlflow module, imported only once a call reaches MLflow: with --mlflow.enabled=false
    every Tracker method is a no-op and mlflow need not be installed (e.g. on a GPU box)."""
    import mlflow
    return mlflow


def start_mlflow(mcfg: MlflowConfig, cfg, master: bool, resume_step: int = 0, local_dir: str | None = None,
                 tags: dict | None = None) -> Tracker:
    """This process's Tracker. On rank 0 with mlflow.enabled: a started MLflow run (tracking URI
    from the config, else $MLFLOW_TRACKING_URI, else MLflow's default local store) with the whole
    config as params and as the artifact config.yaml. Elsewhere an inactive one (every call a
    no-op). `local_dir` (default train.out_dir) gets the offline file and the token-weight pages."""
    run = Tracker(mcfg, cfg.train.out_dir if local_dir is None else local_dir, master)
    if run.active:
        run.start(cfg, {**(tags or {}), **({"resumed_from_step": resume_step} if resume_step else {})})
    return run


# MLflow's HTTP client retries a failed request 7 times with exponential back-off, 120 s each: a
# tracking server that is down (or dies mid-run) froze a run for ~4 min per call, then killed it
# (seen in a new user's trial). For our processes, unless the user set them:
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
UPLOAD_TIMEOUT = "120"   # seconds per request while uploading artifacts (MLflow's default), unless the user set one
OFFLINE_FILE = "mlflow_offline.jsonl"
_SET_BY_US: set[str] = set()


def _http_defaults():
    for k, v in HTTP_DEFAULTS.items():
        if k not in os.environ:
            os.environ[k] = v
            _SET_BY_US.add(k)


@contextlib.contextmanager
def _env(**values):
    """Environment variables for the length of a block (MLflow reads its HTTP settings per request)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())  # the head says what was called, the tail why it failed
    return f"{type(e).__name__}: {text if len(text) < 300 else text[:180] + ' ... ' + text[-110:]}"


def _public_uri(uri: str) -> str:
    """A tracking URI without user:password@ (it goes into mtp_config.json)."""
    from urllib.parse import urlsplit, urlunsplit
    p = urlsplit(uri)
    return urlunsplit(p._replace(netloc=p.netloc.rpartition("@")[2])) if "@" in p.netloc else uri


class Tracker:
    """One MLflow run on rank 0 that never stops or stalls the work it tracks.

    - MLflow's HTTP settings get short defaults (HTTP_DEFAULTS: a refused connection costs ~5 s,
      a server that never answers ~35 s, once), uploads 120 s per request.
    - The first MLflow call that fails prints one warning; the run is *offline* from then on:
      params, metrics and tags go to <local_dir>/mlflow_offline.jsonl (`replay_offline` sends them
      to MLflow later), artifacts and registration are skipped (their files stay in local_dir),
      and MLflow is not called again.
    - A failed artifact upload (e.g. S3 down) skips later artifacts; params and metrics go on.
    Inactive (every call a no-op) on ranks > 0 and with mlflow.enabled=false.
    """

    def __init__(self, mcfg: MlflowConfig | None = None, local_dir: str = "", master: bool = False):
        self.cfg, self.local_dir = mcfg, local_dir or "."
        self.active = bool(master and mcfg is not None and mcfg.enabled)
        self.run_id = self.uri = self.offline = None
        self.artifacts_ok, self.model_tags = True, {}
        self.weight_pages = None  # step -> viz page; set by a training script, called on every rank
        self._pages_failed = False

    # ---- the guarded calls ----
    def _call(self, what: str, fn, record: dict | None = None):
        """fn() while MLflow works; once it has failed (this call included), `record` goes to the
        offline file instead. Any exception counts: tracking must never stop training."""
        if not self.active:
            return None
        if self.offline is None:
            try:
                return fn()
            except Exception as e:
                self._go_offline(what, e)
        if record is not None:
            self._keep(record)
        return None

    def _go_offline(self, what: str, e: Exception):
        import mlflow
        self.offline = os.path.join(self.local_dir, OFFLINE_FILE)
        print(f"warning: MLflow failed to {what} at {self.uri} ({_short(e)}). Training goes on without "
              f"it: params, metrics and tags from now on are kept in {self.offline} (tracking.replay_offline "
              f"sends them to MLflow later); artifacts and model registration are skipped (the files stay "
              f"in {self.local_dir}).", file=sys.stderr, flush=True)
        self._keep({"offline": {"tracking_uri": self.uri, "experiment": self.cfg.experiment,
                                "run_id": self.run_id, "error": _short(e)}})
        if self.run_id:  # leave the run (status FAILED if the server hears it), without waiting on it
            with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="2"), \
                    contextlib.suppress(Exception):
                mlflow.end_run("FAILED")

    def _keep(self, record: dict):
        try:
            os.makedirs(self.local_dir, exist_ok=True)
            with open(self.offline, "a") as f:
                f.write(json.dumps({"time": int(time.time() * 1000), **record}, default=str) + "\n")
        except OSError as e:
            print(f"warning: cannot write {self.offline} ({e}): this tracking record is dropped", file=sys.stderr)

    def _upload(self, what: str, fn) -> bool:
        if not (self.active and self.offline is None and self.artifacts_ok):
            return False
        try:
            timeout = {"MLFLOW_HTTP_REQUEST_TIMEOUT": UPLOAD_TIMEOUT} if "MLFLOW_HTTP_REQUEST_TIMEOUT" in _SET_BY_US else {}
            with _env(**timeout):
                fn()
            return True
        except Exception as e:
            self.artifacts_ok = False
            print(f"warning: MLflow could not store {what} ({_short(e)}): no artifacts of this run are "
                  f"uploaded from now on (the files stay in {self.local_dir}); params and metrics still are.",
                  file=sys.stderr, flush=True)
            return False

    # ---- the run ----
    def start(self, cfg, tags: dict):
        import mlflow
        import yaml
        _http_defaults()
        self.uri = self.cfg.tracking_uri or mlflow.get_tracking_uri()  # the latter reads $MLFLOW_TRACKING_URI
        name = self.cfg.experiment

        def go():
            mlflow.set_tracking_uri(self.uri)
            if mlflow.get_experiment_by_name(name) is None:
                # artifacts of a sqlite:/// store beside its file (MLflow's default: ./mlruns of the cwd)
                db = self.uri[len("sqlite:///"):] if self.uri.startswith("sqlite:///") else ""
                location = self.cfg.artifact_location or (os.path.join(os.path.dirname(os.path.abspath(db)), "mlruns")
                                                          if db else None)
                with contextlib.suppress(mlflow.exceptions.MlflowException):  # made meanwhile by another run
                    mlflow.create_experiment(name, artifact_location=location)
            mlflow.set_experiment(name)
            self.run_id = mlflow.start_run(run_name=self.cfg.run_name or None, tags=tags).info.run_id
        self._call("start a run", go, {"start": {"run_name": self.cfg.run_name, "tags": tags}})
        self.log_params(flatten_config(cfg))
        self._upload("config.yaml", lambda: mlflow.log_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False),
                                                            "config.yaml"))

    def log_params(self, params: dict):
        self._call("log params", lambda: _mlflow().log_params(params), {"params": params})

    def log_metrics(self, metrics: dict, step: int | None = None):
        self._call("log metrics", lambda: _mlflow().log_metrics(metrics, step=step), {"step": step, "metrics": metrics})

    def set_tags(self, tags: dict):
        self._call("set tags", lambda: _mlflow().set_tags(tags), {"tags": tags})

    def log_artifact(self, path: str, artifact_path: str | None = None) -> bool:
        return self._upload(os.path.basename(path), lambda: _mlflow().log_artifact(path, artifact_path))

    def set_model_tags(self, **tags):
        """What the final export is (base model, n_heads, weighting, data, steps): tags of this run
        now, and of the model version that log_export registers."""
        self.model_tags = {k: str(v) for k, v in tags.items()}
        self.set_tags(self.model_tags)

    def link(self) -> dict:
        """What an export records about this run (mtp_config.json), for eval.py to link back."""
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": _public_uri(self.uri),
                "mlflow_experiment": self.cfg.experiment} if self.active and self.run_id else {}

    def log_export(self, path: str):
        """The consolidated export as the run's artifact `final`, registered as a new version of
        mlflow.registered_model (source runs:/RUN_ID/final) with the model tags. The weights
        (*.safetensors) are registered where they lie -- only the small files are uploaded, plus
        export_ref.json naming the export's path, which eval.py then loads from -- when the
        artifact store is a local directory (a copy would only double the disk: 557 MB per 135M
        run, under ./mlruns) or the export is above mlflow.log_artifacts_max_mb; a remote store
        (a tracking server, S3) gets the whole export."""
        if not (self.active and self.cfg.register):
            return
        import shutil
        import socket
        import tempfile
        from urllib.parse import urlsplit

        import mlflow
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        src, tmp = path, None
        active = mlflow.active_run()  # its artifact URI is known locally: no request to a server that may be down
        local_store = active is not None and urlsplit(active.info.artifact_uri).scheme in ("", "file")
        if local_store or size > self.cfg.log_artifacts_max_mb * 2 ** 20:
            tmp = tempfile.mkdtemp(prefix="wmtp-export-")
            src = os.path.join(tmp, "final")
            shutil.copytree(path, src, ignore=shutil.ignore_patterns("*.safetensors"))
            with open(os.path.join(src, "export_ref.json"), "w") as f:
                json.dump({"path": os.path.abspath(path), "host": socket.gethostname(), "bytes": size}, f, indent=2)
        try:
            uploaded = self._upload("the export", lambda: mlflow.log_artifacts(src, "final"))
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        if not uploaded:
            return

        def register():
            client, name = mlflow.MlflowClient(), self.cfg.registered_model or self.cfg.experiment
            try:
                client.create_registered_model(name)
            except mlflow.exceptions.MlflowException as e:
                if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            v = client.create_model_version(name, f"runs:/{self.run_id}/final", run_id=self.run_id,
                                            tags=self.model_tags)
            how = f"weights referenced at {os.path.abspath(path)}" if tmp else f"{size / 2 ** 20:.1f} MB uploaded"
            print(f"registered models:/{name}/{v.version} ({how})")
        self._call("register the export", register)

    def tag_model_versions(self, spec: str, training_run_id: str | None, tags: dict) -> list:
        """Write `tags` (eval.py's pass@k) onto the model versions evaluated: the one `spec` names
        (models:/NAME/VERSION) and those registered from `training_run_id`."""
        import re

        def go():
            client = _mlflow().MlflowClient()
            m = re.fullmatch(r"models:/([^/@]+)/(\d+)/?", spec)
            versions = {(m[1], m[2])} if m else set()
            if training_run_id:
                versions |= {(v.name, v.version) for v in client.search_model_versions(f"run_id='{training_run_id}'")}
            for name, version in sorted(versions):
                for k, v in tags.items():
                    client.set_model_version_tag(name, version, k, str(v))
            return sorted(versions)
        return self._call("tag the model version", go, {"version_tags": tags}) or []

    def draw_weight_pages(self, step: int):
        """The token-weight pages (viz.py) of the run's fixed held-out examples at `step`. Every
        rank computes them (a forward under FSDP is a collective); rank 0 writes them under
        <local_dir>/token_weights/ and logs them as artifacts there. A failure to draw is one
        warning, not the end of training."""
        if self.weight_pages is None or not (self.cfg and self.cfg.enabled and self.cfg.weight_pages > 0):
            return
        page = self.weight_pages(step)
        if not self.active or self._pages_failed:
            return
        try:
            from support import viz
            paths = viz.save(page, os.path.join(self.local_dir, "token_weights"), f"step_{step:06d}")
        except Exception as e:
            self._pages_failed = True
            print(f"warning: token-weight pages failed ({_short(e)}); training goes on without them", file=sys.stderr)
            return
        for p in paths:
            self.log_artifact(p, "token_weights")

    def end(self, status: str = "FINISHED"):
        if not self.active:
            return
        import mlflow
        if self.offline:
            self._keep({"end": status})
            print(f"MLflow was unreachable: this run's params and metrics from then on are in {self.offline}")
        else:
            self._call("end the run", lambda: mlflow.end_run(status))
        self.active = False


def replay_offline(path: str, tracking_uri: str = "") -> str:
    """Send what a Tracker kept offline (`path`: a mlflow_offline.jsonl) to MLflow once it works
    again -- into the run it had started, or a new run of its experiment -> the run id:
        python -c "from support import tracking; tracking.replay_offline('out/rho1/mlflow_offline.jsonl')"
    """
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    head = next(r["offline"] for r in rows if "offline" in r)
    client = mlflow.MlflowClient(tracking_uri or head["tracking_uri"])
    run_id = head["run_id"]
    if run_id is None:
        start = next((r["start"] for r in rows if "start" in r), {})
        exp = client.get_experiment_by_name(head["experiment"])
        exp_id = exp.experiment_id if exp else client.create_experiment(head["experiment"])
        run_id = client.create_run(exp_id, run_name=start.get("run_name") or None,
                                   tags={k: str(v) for k, v in start.get("tags", {}).items()}).info.run_id
    for r in rows:
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in r.get("params", {}).items()],
                         tags=[RunTag(k, str(v)) for k, v in r.get("tags", {}).items()],
                         metrics=[Metric(k, float(v), r["time"], r.get("step") or 0) for k, v in r.get("metrics", {}).items()])
    client.set_terminated(run_id, next((r["end"] for r in rows if "end" in r), "FAILED"))
    return run_id


def export_link(path: str) -> dict:
    """The MLflow run a consolidated export was trained in (its mtp_config.json), or {}."""
    try:
        with open(os.path.join(path, model_io.MTP_CONFIG)) as f:
            return {k: v for k, v in json.load(f).items() if k.startswith("mlflow_")}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def mlflow_model(spec: str, mcfg: MlflowConfig):
    """A model spec `models:/NAME/VERSION` or `runs:/RUN_ID/PATH` -> a local directory with its
    artifacts (downloaded into a temporary directory, removed on exit; an export registered by
    reference resolves to the path its export_ref.json names). Any other spec is yielded as is."""
    if not spec.startswith(("models:/", "runs:/")):
        yield spec
        return
    import shutil
    import tempfile

    import mlflow
    _http_defaults()
    if mcfg.tracking_uri:
        mlflow.set_tracking_uri(mcfg.tracking_uri)
    tmp = tempfile.mkdtemp(prefix="wmtp-model-")
    try:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=tmp)
        except Exception as e:
            raise FileNotFoundError(f"model {spec!r}: cannot download it from MLflow at "
                                    f"{mlflow.get_tracking_uri()} ({_short(e)})") from None
        if os.path.isfile(os.path.join(path, "export_ref.json")):
            with open(os.path.join(path, "export_ref.json")) as f:
                ref = json.load(f)
            if not os.path.isfile(os.path.join(ref["path"], model_io.MTP_CONFIG)):
                raise FileNotFoundError(f"model {spec!r} was registered by reference to {ref['path']} on host "
                                        f"{ref['host']} (larger than mlflow.log_artifacts_max_mb), which is not here")
            path = ref["path"]
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
