"""`elmforest merge ...` verbs: argument parsing only."""

from __future__ import annotations

from elmforest.utils.argtypes import positive_float, positive_int
from elmforest.utils.errors import UserError


def add_merge_parsers(sub) -> None:
    mg = sub.add_parser("merge", help="merge a forest's experts into one model").add_subparsers(
        dest="merge_cmd", required=True
    )
    p = mg.add_parser(
        "moe",
        help="merge the experts into one Mixtral mixture-of-experts checkpoint (BTX / FlexOlmo)",
    )
    p.add_argument("--forest", required=True)
    p.add_argument("--out", required=True, help="output HF checkpoint directory")
    p.add_argument("--top-k", type=positive_int, default=2, help="experts per token")
    p.add_argument(
        "--shared",
        default="average",
        choices=["average", "seed"],
        help="shared weights (embeddings, attention, norms, head): the experts' average (BTX) or the seed's (FlexOlmo)",
    )
    p.add_argument(
        "--router", default="domain-embeddings", choices=["domain-embeddings", "hidden-states", "random"]
    )
    p.add_argument(
        "--router-center",
        action="store_true",
        help="subtract the mean router row over experts before normalising (sharper routing)",
    )
    p.add_argument(
        "--sample-tokens",
        type=positive_int,
        default=16384,
        help="tokens of each expert's data for its router row",
    )
    p.add_argument(
        "--exclude", action="append", default=[], metavar="NAME", help="leave an expert out (repeatable)"
    )
    p.add_argument(
        "--data",
        help="shards holding the experts' training domains (default: the shards each expert was trained on)",
    )
    p.add_argument(
        "--train-router", action="store_true", help="then train only the router rows (FlexOlmo RT)"
    )
    p.add_argument("--steps", type=positive_int, default=100, help="router training steps")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="router training learning rate")
    p.add_argument("--batch-size", type=positive_int, default=16, help="router training sequences per step")
    p.add_argument(
        "--train-data", help="shards for router training (default: --data, else the first expert's shards)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-shard-bytes", type=positive_int, help="default: one expert's checkpoint size")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")


def dispatch(args) -> int:
    from elmforest.merge.moe import MoeSpec, export_moe, train_router
    from elmforest.utils.io import read_json

    spec = MoeSpec(
        top_k=args.top_k,
        shared=args.shared,
        router=args.router,
        center=args.router_center,
        sample_tokens=args.sample_tokens,
        exclude=args.exclude,
    )
    out = export_moe(
        args.forest, args.out, spec, data=args.data, device=args.device, max_shard_bytes=args.max_shard_bytes
    )
    meta = read_json(out / "elmforest_moe.json")
    names = ", ".join(e["name"] for e in meta["experts"])
    print(f"merged {len(meta['experts'])} experts ({names}) into a Mixtral MoE, top-{meta['top_k']} -> {out}")
    if args.train_router:
        shards = args.train_data or args.data
        if shards is None:
            first = out / "elmforest_run.json"
            shards = read_json(first)["data"]["shards"] if first.is_file() else None
        if shards is None:
            raise UserError("--train-router needs --train-data SHARDS")
        train_router(
            out,
            shards,
            args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            overrides=args.overrides,
            progress=not args.no_progress,
            device=None if args.device == "auto" else args.device,
        )
        print(f"trained the router for {args.steps} steps on {shards} -> {out}")
    return 0
