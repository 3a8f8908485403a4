"""What the BTM quickstart (and X-ELM's) prints beside its tables: the precision it ran at, the FLOPs
ledger, the cached priors and the posterior's ablations. Apart from quickstart.py, which runs the arms."""

from __future__ import annotations

from elmforest.eval.report import flops_mark
from elmforest.utils.device import resolve_device, resolve_precision


def precision_line(precision: str, device: str, eval_bytes: int = 64_000) -> str:
    dev = resolve_device(device)
    amp = resolve_precision(precision, dev)
    if dev.type != "cpu":
        return f"{'bf16 autocast' if amp else 'fp32'} on {dev}"
    if amp is not None:
        return "bf16 autocast on the CPU (it has AVX512-BF16 or AMX)"
    why = "train.precision=fp32" if precision == "fp32" else "this CPU has no AVX512-BF16/AMX"
    return f"fp32 on the CPU ({why}); about 1.3x the bf16 time (--eval-bytes {eval_bytes // 2} shortens it)"


def print_ledger(compute: dict, log) -> None:
    log("training compute (FLOPs counted by what ran; frozen weights cost no weight gradient):")
    for row in compute["ledger"]:
        log(f"      {row['phase']:16s} {row['name']:24s} {row['flops']:.4e}")
    log(
        f"      forest (seed + experts) / dense = {compute['forest_over_dense']:.6f}; per method: "
        + ", ".join(f"{m} {flops_mark(r)}" for m, r in compute["methods"].items())
    )


def print_priors(priors: dict, ablations: dict, ood_ablations: dict | None, log) -> None:
    for where, table in priors.items():
        if not table:
            continue
        cells = ", ".join(f"{d} -> {v['expert']} {v['weight']:.2f}" for d, v in table.items())
        log(f"cached prior's largest entry ({where.replace('_', '-')}): {cells}")
    for where, ab in (("in-domain", ablations), ("out-of-domain", ood_ablations)):
        if not ab:
            continue
        cells = "; ".join(
            f"{m}: restarted at each document {v['document']:.4f}, carried across documents {v['window']:.4f}"
            for m, v in ab["document_reset"].items()
        )
        log(f"posterior at document boundaries ({where}, mean BPB): {cells}")
        pe = ab["prior_estimate"]
        log(
            f"cached prior estimated as the mean over valid windows vs BTM's moving average ({where}, mean BPB): "
            + "; ".join(f"{m} {pe['mean'][m]:.4f} vs {pe['ema_0.3'][m]:.4f}" for m in pe["mean"])
        )
