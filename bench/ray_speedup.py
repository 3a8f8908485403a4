"""Wall time to train 4 tiny experts: Ray with 2 workers vs the local executor, side by side.

    python bench/ray_speedup.py [--experts 4] [--steps 600]

Both train the same 4 experts (one per synthetic domain) from the same seed with 1 thread each; the
seed is trained once and shared. Reports the speed-up and Ray's scheduling overhead per expert
(wall time minus the experts' own training time, divided by the number of experts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from elmforest.data.bpe import train_bpe_on
from elmforest.data.shards_build import build_shards
from elmforest.forest import btm
from elmforest.forest.manifest import Forest
from elmforest.launch.executor import LocalExecutor, RayExecutor
from elmforest.launch.jobs import ExpertJob, as_dict, run_job
from elmforest.model.presets import preset_run_config

try:
    from common import synthetic_corpus
except ImportError:
    from bench.common import synthetic_corpus


def main() -> None:
    import ray

    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = synthetic_corpus(tmp / "corpus", n_docs=800)
        tok, _ = train_bpe_on(corpus, 512)
        shards = build_shards(corpus, tok, tmp / "shards", random_domains=args.experts, progress=False)
        from elmforest.data.shards import Shards

        sh = Shards(shards.out)
        base = preset_run_config("tiny", str(sh.root))
        base.train.steps, base.train.batch_size, base.train.precision = args.steps, 8, "fp32"
        plan, base = btm.plan_for(base, args.experts)
        seed_forest = Forest.init(tmp / "seed")
        btm.train_seed(seed_forest, sh, base, plan, progress=False)

        def fresh(name):
            shutil.copytree(tmp / "seed", tmp / name)
            return Forest.load(tmp / name)

        def jobs(f):
            js = [ExpertJob(str(f.root), str(sh.root), d, threads=1) for d in sh.domains]
            return [as_dict(j) for j in js], [j.label for j in js], [j.run_dir() / "job.log" for j in js]

        results = {}
        for name, ex in (("local", LocalExecutor()), ("ray", RayExecutor(cpus_per_job=1, max_retries=1))):
            f = fresh(name)
            if name == "ray":
                ray.init(
                    num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1"
                )
                ray.get(ray.remote(lambda: 1).remote())  # workers up before the clock starts
            t = time.perf_counter()
            ex.map(run_job, *jobs(f))
            wall = time.perf_counter() - t
            train_s = sum(
                json.loads((f.root / "runs" / d / "summary.json").read_text())["wall_s"] for d in sh.domains
            )
            results[name] = (wall, train_s)
        ray.shutdown()
        (lw, lt), (rw, rt) = results["local"], results["ray"]
        print(
            f"{args.experts} tiny experts x {args.steps - plan.seed_steps} steps, 1 thread each, 2 CPU cores"
        )
        print(f"local executor: {lw:.1f}s wall ({lt:.1f}s of training)")
        print(f"ray, 2 workers: {rw:.1f}s wall ({rt:.1f}s of training in the workers)")
        print(
            f"speed-up {lw / rw:.2f}x; scheduling overhead {(rw - rt / 2) / args.experts:.2f}s per expert "
            "(wall minus half the summed training time, per expert)"
        )


if __name__ == "__main__":
    main()
