"""MLflow: one MLflow run per elmforest run, in a file store inside the run directory.

The store is `RUN/mlruns` (`mlflow ui --backend-store-uri RUN/mlruns`), so a run directory stays
self-contained and nothing needs a server; MLFLOW_TRACKING_URI, when set, names another store (a
shared server or database: the user's choice, and then the user's network). MLflow 3 keeps the file
store only behind MLFLOW_ALLOW_FILE_STORE=true; it is set for our calls into MLflow alone (tracking.env).
MLflow 3 also sends usage telemetry to its makers unless MLFLOW_DISABLE_TELEMETRY is set when it is
imported: it is set then, and a telemetry client already running (MLflow imported earlier by the
calling code) is switched off for the process.
The client API is used, not MLflow's global "active run", so a run never adopts or ends one the
calling code started. Params are the flattened config (`train.steps`, ...; values past MLflow's length
limit truncated, the whole config also as the artifact run_config.json); metrics are `train/*` and
`valid/loss` at their steps. The MLflow run id is kept in RUN/trackers.json: a run resumed from its own
checkpoint continues the same MLflow run, and in its own store the points a killed session logged past
that checkpoint are dropped, so each step keeps one value as in metrics.jsonl (another store keeps
them: MLflow cannot delete a metric point). A fresh start deletes RUN/mlruns (an earlier start killed
before its first checkpoint), as TensorBoard's events are deleted; a run directory moved or copied
points its store's artifact locations at the new place when it resumes. A failed run ends FAILED (KILLED
on Ctrl-C), a paused or complete one FINISHED, tagged elmforest.state paused/complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from elmforest.train.tracking import Tracker, env, gap, history, save_tracker_id, scalars, tracker_ids
from elmforest.utils.io import write_text_atomic

# for each call into MLflow only (tracking.env): the file store allowed, usage telemetry off
ENV = {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
# a tracking server that does not answer: MLflow's own defaults (7 retries, backing off, 120 s each) held
# up the first step for 4.6 minutes per run, every expert of a forest in turn; yours, where you set them
NETWORK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def _env() -> dict[str, str]:
    return {**{k: v for k, v in NETWORK.items() if k not in os.environ}, **ENV}


class MlflowLogger(Tracker):
    name, key = "MLflow", "mlflow"

    def __init__(self, run_dir: Path, mlflow):
        self.run_dir, self.mlflow, self.run_id = Path(run_dir), mlflow, None
        self.store = os.environ.get("MLFLOW_TRACKING_URI") or None  # None: our own, RUN/mlruns
        self.uri = self.store or (self.run_dir.resolve() / "mlruns").as_uri()

    def start(self, trainer):
        from mlflow.tracking import MlflowClient

        resumed = trainer.resumed_from is not None  # a branch (init_checkpoint) is a new run
        known = tracker_ids(self.run_dir).get("mlflow") or {}
        same_store = known.get("store") == self.store
        with env(**_env()):
            _telemetry_off()
            if not resumed and self.store is None and (self.run_dir / "mlruns").is_dir():
                shutil.rmtree(self.run_dir / "mlruns")
            if resumed and self.store is None and (self.run_dir / "mlruns").is_dir():
                _relocate(self.run_dir / "mlruns")
            self.client = MlflowClient(tracking_uri=self.uri)
            if resumed and same_store and self._exists(known.get("run_id")):
                self.run_id = known["run_id"]
                if self.store is None:
                    self._drop_points_after(trainer.step)
                self.client.update_run(self.run_id, status="RUNNING")
                self._metrics(
                    gap(self.run_dir, self.key, trainer.step, had_output=True)
                )  # sessions it was off
                return
            if not resumed and same_store and known.get("run_id") and self.store is not None:
                with contextlib.suppress(Exception):  # an earlier start, killed: not left RUNNING
                    if self.client.get_run(known["run_id"]).info.status == "RUNNING":
                        self.client.set_terminated(known["run_id"], "KILLED")
            if resumed and known.get("run_id") and not same_store:
                print(
                    f"note: {self.run_dir.name}: MLflow's store is now {self.store or 'RUN/mlruns'} (it was "
                    f"{known.get('store') or 'RUN/mlruns'}): the run goes on as a new MLflow run there, with "
                    "its steps so far copied from metrics.jsonl",
                    file=sys.stderr,
                )
            run = self.client.create_run(
                self._experiment(),
                run_name=self.run_dir.name,
                tags={"elmforest.run_dir": str(self.run_dir.resolve())},
            )
            self.run_id = run.info.run_id
            save_tracker_id(self.run_dir, "mlflow", {"run_id": self.run_id, "store": self.store})
            cfg = trainer.cfg.to_dict()
            params = _params(cfg)
            for i in range(0, len(params), 100):  # MLflow's most params per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
            self.client.log_dict(self.run_id, cfg, "run_config.json")
        if resumed:  # a new MLflow run for a resumed run (chosen only now, another store): its history so far
            self._metrics(list(history(self.run_dir, trainer.step)))

    def _experiment(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "elmforest"
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created meanwhile by another run in a shared store
            return self.client.get_experiment_by_name(name).experiment_id

    def _exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:
            return False

    def _drop_points_after(self, step: int) -> None:
        """Rewrite our file store's metric files (lines `timestamp value step`) without the points
        past `step`: those came from a session killed after its last checkpoint."""
        exp = self.client.get_run(self.run_id).info.experiment_id
        for f in (self.run_dir / "mlruns" / exp / self.run_id / "metrics").rglob("*"):
            if not f.is_file():
                continue
            lines = f.read_text().splitlines()
            keep = [ln for ln in lines if len(ln.split()) < 3 or int(ln.split()[2]) <= step]
            if len(keep) != len(lines):
                write_text_atomic(f, "".join(ln + "\n" for ln in keep))

    def _metrics(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        """Log (step, {name: value}) points, in batches of at most 1000 (MLflow's most per batch)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        points = [Metric(k, v, ts, s) for s, values in steps for k, v in values.items()]
        with env(**_env()):
            for i in range(0, len(points), 1000):
                self.client.log_batch(self.run_id, metrics=points[i : i + 1000])

    def log(self, trainer, m):
        self._metrics([(m["step"], scalars(m))])

    def valid(self, trainer, m):
        self._metrics([(m["step"], {"valid/loss": m["valid_loss"]})])

    def end(self, trainer, summary):
        self._terminate("FINISHED", "complete" if summary else "paused")

    def abort(self, trainer):
        stopped = isinstance(sys.exc_info()[1], KeyboardInterrupt | SystemExit)  # Ctrl-C, SIGTERM
        self._terminate("KILLED" if stopped else "FAILED", "failed")

    def _terminate(self, status: str, state: str) -> None:
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        with env(**_env()):
            self.client.set_tag(run_id, "elmforest.state", state)
            self.client.set_terminated(run_id, status)


def _relocate(store: Path) -> None:
    """Point our file store's artifact locations at where the store is now. MLflow writes them into
    meta.yaml as absolute file URIs, so a run directory moved or copied (a quickstart folder copied
    with `cp -a`) would keep reading and writing its artifacts (run_config.json) in the old place, or
    find none once that is deleted. Each location must be the store's own, so one that ends as ours
    does (`/<experiment>` or `/<experiment>/<run>/artifacts`) under another folder is rewritten."""
    store = store.resolve()
    metas = [(m, "artifact_location", m.parent) for m in store.glob("*/meta.yaml")]
    metas += [(m, "artifact_uri", m.parent / "artifacts") for m in store.glob("*/*/meta.yaml")]
    for meta, key, own in metas:
        try:
            lines = meta.read_text().splitlines(keepends=True)
        except OSError:
            continue
        tail = "/" + own.relative_to(store).as_posix()
        for i, line in enumerate(lines):
            value = line[len(key) + 1 :].strip() if line.startswith(key + ":") else None
            if value and value.startswith("file:") and value.endswith(tail) and value != own.as_uri():
                lines[i] = f"{key}: {own.as_uri()}\n"
                write_text_atomic(meta, "".join(lines))
                break


def _telemetry_off() -> None:
    """A telemetry client started by an earlier import of MLflow, switched off (re-reading the
    environment, where ENV has turned it off); MLflow before 3 has none."""
    try:
        from mlflow.telemetry.client import get_telemetry_client, set_telemetry_client
    except ImportError:
        return
    if get_telemetry_client() is not None:
        set_telemetry_client()


def _params(cfg: dict) -> list:
    """The config flattened to MLflow params: dotted keys, JSON values (strings as they are)."""
    from mlflow.entities import Param

    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
    except ImportError:
        limit = 500  # the oldest MLflow's limit

    def flat(d: dict, prefix: str = ""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v if isinstance(v, str) else json.dumps(v)

    out = []
    for k, v in flat(cfg):
        if len(v) > limit:
            v = v[: limit - 40] + f"... ({len(v)} chars; see run_config.json)"
        out.append(Param(k, v))
    return out
