"""Weights & Biases, offline only: a run's metrics as W&B history in its own directory, for
`wandb sync` to upload later from wherever has a network and an account.

Offline is forced, not defaulted: training machines often may not reach the internet, and a run must
never stall or fail on a login. Everything W&B writes stays under RUN/wandb/ (its cache and config
directories included), and what would contact a server is off: error reporting (W&B's telemetry,
sent even offline), the system monitor (it probes a cloud metadata address), git and code capture.
The W&B run id is kept in RUN/trackers.json: a resumed run (from its own checkpoint) continues the same
W&B run; each session is a directory RUN/wandb/offline-run-*-ID, which `wandb sync` uploads in order
of start time as one run. Steps a killed session logged past its last checkpoint stay in that
session's directory (W&B keeps history in step order; metrics.jsonl is the record). trackers.json
marks the W&B run open while a session runs: a session killed outright (its buffer never written) or a
W&B chosen only on resume gets the steps up to the checkpoint replayed from the logs. A fresh start
deletes RUN/wandb/ (an earlier start killed before its first checkpoint) and takes a new id, as
TensorBoard's events are deleted. The process's W&B session is torn down when the run ends, so the
next run in the same process (a forest's experts) starts its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from pathlib import Path

from elmforest.train.tracking import Tracker, env, gap, history, save_tracker_id, scalars, tracker_ids


class WandbLogger(Tracker):
    name, key = "W&B", "wandb"

    def __init__(self, run_dir: Path, wandb):
        self.run_dir, self.wandb, self.run, self.started = Path(run_dir), wandb, None, False
        self.run_id = None
        root = self.run_dir.resolve() / "wandb"
        self.env = {  # for each call into wandb only (tracking.env)
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(self.run_dir.resolve()),
            "WANDB_ERROR_REPORTING": "false",
            "WANDB_SILENT": "true",
            "WANDB_CONSOLE": "off",
            "WANDB_DISABLE_GIT": "true",
            "WANDB_DISABLE_CODE": "true",
            "WANDB_CACHE_DIR": str(root / ".cache"),
            "WANDB_CONFIG_DIR": str(root / ".config"),
            "WANDB_DATA_DIR": str(root / ".data"),
            "WANDB_ARTIFACT_DIR": str(root / ".artifacts"),
        }

    def start(self, trainer):
        resumed = trainer.resumed_from is not None  # a branch (init_checkpoint) is a new run
        known = (tracker_ids(self.run_dir).get("wandb") or {}) if resumed else {}
        run_id = known.get("id")
        # W&B writes its file from a buffer: a session killed (SIGKILL) while "open" may have written none
        # of its steps, and a tracker chosen only on resume saw none. Both replay what the checkpoint holds
        # (W&B keeps the first value of a step it already has when the sessions are synced)
        replay = resumed and (run_id is None or known.get("open", False))
        if not resumed and (self.run_dir / "wandb").is_dir():
            shutil.rmtree(self.run_dir / "wandb")
        self.run_id = run_id = run_id or uuid.uuid4().hex[:16]
        save_tracker_id(self.run_dir, "wandb", {"id": run_id, "open": True})
        wandb = self.wandb
        with env(**self.env):
            settings = wandb.Settings(
                silent=True,
                console="off",
                x_disable_stats=True,
                x_disable_meta=True,
                x_disable_machine_info=True,
                disable_git=True,
                disable_code=True,
                save_code=False,
                disable_job_creation=True,
                x_save_requirements=False,
            )
            self.started = True  # from here on the process has a W&B session to tear down
            self.run = wandb.init(
                mode="offline",
                dir=str(self.run_dir.resolve()),
                project=os.environ.get("WANDB_PROJECT") or "elmforest",
                name=self.run_dir.name,
                config=trainer.cfg.to_dict(),
                id=run_id,
                resume="allow",
                reinit="create_new",
                settings=settings,
            )
            # everything (never chosen, or a killed session's buffer lost), or the sessions it was off for
            missed = history(self.run_dir, trainer.step) if replay else []
            if resumed and not replay:
                missed = gap(self.run_dir, self.key, trainer.step, had_output=True)
            for step, values in missed:
                self.run.log(values, step=step)

    def log(self, trainer, m):
        with env(**self.env):
            self.run.log(scalars(m), step=m["step"])

    def valid(self, trainer, m):
        with env(**self.env):
            self.run.log({"valid/loss": m["valid_loss"]}, step=m["step"])

    def end(self, trainer, summary):
        self._finish(0)

    def abort(self, trainer):
        self._finish(
            255 if isinstance(sys.exc_info()[1], KeyboardInterrupt | SystemExit) else 1
        )  # Ctrl-C, SIGTERM

    def _finish(self, exit_code: int) -> None:
        if not self.started:
            return
        run, self.run, self.started = self.run, None, False
        with env(**self.env):
            try:
                if run is not None:
                    run.finish(exit_code=exit_code)
                    save_tracker_id(self.run_dir, "wandb", {"id": self.run_id, "open": False})
            finally:
                with contextlib.suppress(Exception):
                    self.wandb.teardown()
