"""Work a forest did again and again, each measured against doing it the old way, side by side:

    OMP_NUM_THREADS=1 python bench/repeated_work.py [--preset btm-125m] [--experts 8 64]

- **init**: a run from `train.init_checkpoint` (an expert from its seed's state, a dense continuation)
  built its model with a random initialisation, then loaded every weight over it
  (`build_model(initialise=False)` now; a seed that was itself a checkpoint, `init_from`, is still
  loaded first).
- **verify**: every expert verified the one seed_state again, sha256 of both tensor files each time
  (hashed once per process now). The checkpoint here is the preset's model and an AdamW state.
- **heatmap**: `merge moe`'s load heatmap labelled every cell on a figure that grew with experts and
  domains; the old path is the same function with the label and size caps lifted (its cells 0.41 inch
  tall where the old code's were 0.40).

Prints seconds per way and their ratio; for the heatmap also the peak of Python's allocations
(tracemalloc: matplotlib's C++ buffers are not in it, so it understates both).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from elmforest.merge import routing
from elmforest.model.build import build_model
from elmforest.model.presets import preset_run_config
from elmforest.train import checkpoint


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def init(preset: str) -> None:
    cfg = preset_run_config(preset, "unused").model
    old = _best(lambda: build_model(cfg, 50_304, 0, initialise=True))
    new = _best(lambda: build_model(cfg, 50_304, 0, initialise=False))
    print(f"init ({preset}): initialised {old:.2f} s, not {new:.3f} s: {old / new:.0f}x")


def verify(preset: str, experts: int) -> None:
    cfg = preset_run_config(preset, "unused").model
    model = build_model(cfg, 50_304, 0, initialise=False)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():  # the moments exist, as in a real checkpoint
        opt.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save_checkpoint(Path(tmp), model, opt, {"step": 1, "tokens": 0}, keep=1)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9

        def every_expert(forget: bool) -> float:  # forget: the old way, hashed for each
            checkpoint._HASHED.clear()
            t = time.perf_counter()
            for _ in range(experts):
                if forget:
                    checkpoint._HASHED.clear()
                checkpoint.verify_checkpoint(path)
            return time.perf_counter() - t

        every_expert(True)  # untimed: the first reads of the files land on neither side
        old, new = every_expert(True), every_expert(False)
    print(
        f"verify ({preset}, {size:.2f} GB, {experts} experts): {old:.2f} s, now {new:.2f} s: {old / new:.1f}x"
    )


def heatmap(n: int) -> None:
    names = [f"e{i}" for i in range(n)]
    m = np.random.default_rng(0).dirichlet(np.full(n, 0.2), size=n)
    stats = {
        "experts": names,
        "top_k": 2,
        "layers": 2,
        "domains": {d: {"load_mean": list(m[i]), "own": [i]} for i, d in enumerate(names)},
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        routing.plot_load(stats, Path(tmp) / "warm.png")  # matplotlib's first figure costs seconds
        for way, caps in (
            ("labelled", (10**9, 10**9)),
            ("now", (routing.MAX_CELL_LABELS, routing.MAX_FIGURE_INCHES)),
        ):
            was = routing.MAX_CELL_LABELS, routing.MAX_FIGURE_INCHES
            routing.MAX_CELL_LABELS, routing.MAX_FIGURE_INCHES = caps
            tracemalloc.start()
            t = time.perf_counter()
            routing.plot_load(stats, Path(tmp) / f"{way}.png")
            out[way] = (time.perf_counter() - t, tracemalloc.get_traced_memory()[1] / 1e6)
            tracemalloc.stop()
            routing.MAX_CELL_LABELS, routing.MAX_FIGURE_INCHES = was
    (ts, ms), (tn, mn) = out["labelled"], out["now"]
    print(
        f"heatmap ({n} experts x {n} domains): labelled {ts:.1f} s / {ms:.0f} MB, now {tn:.1f} s / {mn:.0f} MB: "
        f"{ts / tn:.1f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="btm-125m")
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    a = ap.parse_args()
    init(a.preset)
    verify(a.preset, min(a.experts))
    for n in a.experts:
        heatmap(n)


if __name__ == "__main__":
    main()
