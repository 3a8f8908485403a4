"""Cross-document BPB (issue 17): how much a model gains from related text before a document, and from
a document's own first half. The tasks are built in eval/crossdoc_tasks.py; this module scores them
with one model (forest/crossdoc.py with a forest) and tabulates them.

Every scored sequence s (context, then target; at most seq_len tokens) is read as the stream
`EOS s`, as eval/bpb.py reads a split: the leading EOS is input only, and s[i] is predicted from it
and s[:i]. Only the target's tokens are scored; BPB of a task's condition in a domain is the summed
NLL (nats) of its targets / ln 2 / their summed bytes, and `mean_bpb` the mean over domains (as
eval/bpb.py's). Conditions of a task score exactly the same targets, so their differences (`gain`,
in bits per byte, positive when the context helps) are paired; per-document NLLs are kept in the
result (`documents`) for paired statistics across models.

Batches are right-padded: a causal model's position t sees positions ≤ t only and every sequence
starts at position 0, so the padding after a sequence changes none of its log-probs and no
attention mask (nor position shift) is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer
from elmforest.eval.bpb import check_seq_len, default_seq_len, token_logprobs
from elmforest.eval.crossdoc_tasks import TASKS, Item, build_tasks
from elmforest.model.build import load_model, resolve_model_dir
from elmforest.utils.device import resolve_device, resolve_precision
from elmforest.utils.errors import Diverged, UserError
from elmforest.utils.io import write_json_atomic

# gain name -> (the condition without it, the condition with it): BPB(first) - BPB(second)
GAINS = {
    "retrieval": {
        "related_text": ("random", "retrieved"),  # related vs unrelated text of the same length
        "any_text": ("none", "random"),  # unrelated text vs none
        "retrieved_vs_none": ("none", "retrieved"),
    },
    "second_half": {"first_half": ("none", "first_half")},
}
CONVENTION = (
    "each sequence read as 'EOS context target', target tokens scored only; a whole-document target "
    "includes its EOS (1 byte), a partial one its tokens' UTF-8 bytes"
)


def sequences(items: list[Item], condition: str) -> list[tuple[np.ndarray, int]]:
    """(tokens, context length) of each item under `condition`."""
    return [
        (np.concatenate([it.contexts[condition], it.target]), len(it.contexts[condition])) for it in items
    ]


@torch.no_grad()
def score_sequences(
    model,
    seqs: list[tuple[np.ndarray, int]],
    eos_id: int,
    batch_size: int = 16,
    device: torch.device | None = None,
    amp: torch.dtype | None = None,
    name: str = "model",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood of each context [n], log-probs of each target's tokens [n, longest target], 0
    past its end), float64. Longest sequences first, so a batch pads little."""
    device = device or torch.device("cpu")
    n = len(seqs)
    tmax = max((len(s) - c for s, c in seqs), default=0)
    ctx, tgt = np.zeros(n), np.zeros((n, tmax))
    order = sorted(range(n), key=lambda i: -len(seqs[i][0]))
    for lo in tqdm(range(0, n, batch_size), desc=name, disable=not progress, leave=False):
        idx = order[lo : lo + batch_size]
        width = len(seqs[idx[0]][0])
        x = torch.full((len(idx), width), eos_id, dtype=torch.long)
        y = torch.full((len(idx), width), -100, dtype=torch.long)
        for r, i in enumerate(idx):
            s = torch.from_numpy(np.asarray(seqs[i][0], dtype=np.int64))
            y[r, : len(s)] = s
            x[r, 1 : len(s)] = s[:-1]
        lp = token_logprobs(model, x.to(device), y.to(device), amp).double().cpu()
        if not bool(torch.isfinite(lp).all()):
            raise Diverged(f"{name}: non-finite log-probabilities: corrupt or diverged weights")
        lp = lp.numpy()
        for r, i in enumerate(idx):
            s, c = seqs[i]
            ctx[i] = lp[r, :c].sum()
            tgt[i, : len(s) - c] = lp[r, c : len(s)]
    return ctx, tgt


def summarize(tasks: dict[str, list[Item]], nll: dict[tuple[str, str], np.ndarray]) -> dict:
    """Per task: per condition, per domain BPB (and its sums), the macro mean, the gains, and the
    per-document NLLs. `nll[(task, condition)]` holds one summed target NLL per item."""
    out = {}
    for task, items in tasks.items():
        doms = list(dict.fromkeys(it.domain for it in items))
        conds, docs = {}, {}
        for d in doms:
            sel = [i for i, it in enumerate(items) if it.domain == d]
            docs[d] = {
                "doc": [items[i].doc for i in sel],
                "bytes": [items[i].nbytes for i in sel],
                "tokens": [len(items[i].target) for i in sel],
            }
        for cond in TASKS[task]:
            per = {}
            for d in doms:
                sel = np.array([i for i, it in enumerate(items) if it.domain == d])
                s = float(nll[(task, cond)][sel].sum())
                nbytes = int(sum(items[i].nbytes for i in sel))
                if not math.isfinite(s):
                    raise Diverged(f"the {task}/{cond} loss on {d} is {s}: corrupt or diverged weights")
                per[d] = {
                    "bpb": s / math.log(2) / nbytes,
                    "nll_nats": s,
                    "tokens": int(sum(len(items[i].target) for i in sel)),
                    "bytes": nbytes,
                    "documents": len(sel),
                }
                docs[d][cond] = nll[(task, cond)][sel].tolist()
            conds[cond] = {
                "domains": per,
                "mean_bpb": float(np.mean([v["bpb"] for v in per.values()])) if per else None,
            }
        gains = {}
        for g, (a, b) in GAINS[task].items():
            per = {d: conds[a]["domains"][d]["bpb"] - conds[b]["domains"][d]["bpb"] for d in doms}
            gains[g] = {"domains": per, "mean": float(np.mean(list(per.values()))) if per else None}
        out[task] = {"conditions": conds, "gain": gains, "documents": docs}
    return out


def resolve_tasks(tasks) -> tuple[str, ...]:
    if isinstance(tasks, str):
        tasks = tuple(t.strip() for t in tasks.split(",") if t.strip())
    return tuple(tasks)


@dataclass(frozen=True)
class TaskOptions:
    """How the tasks are built (build_tasks' options): evaluate_crossdoc and evaluate_forest_crossdoc
    take the same ones, so a dense model's and a forest's results score the same targets."""

    seq_len: int | None = None  # default: the (first) model's training context
    target_len: int | None = None
    max_docs: int | None = 200
    seed: int = 0
    tasks: tuple[str, ...] | str = tuple(TASKS)
    neighbours: int = 64
    max_cosine: float = 0.9
    domains: list[str] | None = None


@dataclass
class Prepared:
    """The shards, the resolved seq_len and the built tasks: what every scorer starts from."""

    shards: Shards
    seq_len: int
    items: dict[str, list[Item]]
    info: dict
    options: TaskOptions

    def header(self, dev, amp) -> dict:
        """What every cross-document result records about how it was made."""
        o = self.options
        return {
            "shards": str(self.shards.root),
            "split": "test",
            "seq_len": self.seq_len,
            "target_len": self.info["target_len"],
            "max_docs": o.max_docs,
            "seed": o.seed,
            "neighbours": o.neighbours,
            "max_cosine": o.max_cosine,
            "built": self.info,
            "device": str(dev),
            "precision": str(amp or torch.float32).replace("torch.", ""),
            "convention": CONVENTION,
        }


def prepare_crossdoc(
    shards_path: str | Path,
    options: TaskOptions,
    model_dirs: list[Path],
    fingerprint: str,
    whose: str,
) -> Prepared:
    """Open the shards, refuse them unless tokenized with the models' tokenizer (`fingerprint`;
    `whose` names it in the error), check seq_len against every model's positions (default: the
    first model's training context), and build the tasks."""
    shards = Shards(shards_path)
    if shards.tokenizer_fingerprint != fingerprint:
        raise UserError(f"{shards.root} was tokenized with a different tokenizer than {whose}")
    seq_len = options.seq_len or default_seq_len(model_dirs[0])
    for d in model_dirs:
        check_seq_len(d, seq_len)
    shards.check_eos(load_tokenizer(model_dirs[0]).eos_id, model_dirs[0])  # its boundaries, not text
    o = options
    items, info = build_tasks(
        shards,
        seq_len,
        target_len=o.target_len,
        max_docs=o.max_docs,
        seed=o.seed,
        tasks=resolve_tasks(o.tasks),
        neighbours=o.neighbours,
        max_cosine=o.max_cosine,
        domains=o.domains,
    )
    return Prepared(shards, seq_len, items, info, options)


def evaluate_crossdoc(
    model_path: str | Path,
    shards_path: str | Path,
    seq_len: int | None = None,
    target_len: int | None = None,
    max_docs: int | None = 200,
    seed: int = 0,
    tasks=tuple(TASKS),
    neighbours: int = 64,
    max_cosine: float = 0.9,
    domains: list[str] | None = None,
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = False,
    out: str | Path | None = None,
) -> dict:
    """Cross-document BPB of one model (a run dir or HF checkpoint) on a shards dir made with its
    tokenizer; `seq_len` defaults to the model's training context. Written atomically to `out`."""
    mdir = resolve_model_dir(model_path)
    opts = TaskOptions(seq_len, target_len, max_docs, seed, tasks, neighbours, max_cosine, domains)
    prep = prepare_crossdoc(shards_path, opts, [mdir], load_tokenizer(mdir).fingerprint(), str(mdir))
    dev = resolve_device(device)
    amp = resolve_precision(precision, dev)
    model = load_model(mdir, trust_remote_code=trust_remote_code).to(dev).eval()
    items, eos, nll = prep.items, prep.shards.eos_id, {}
    for task, its in items.items():
        for cond in TASKS[task]:
            _, tgt = score_sequences(
                model, sequences(its, cond), eos, batch_size, dev, amp, f"{task}/{cond}", progress
            )
            nll[(task, cond)] = -tgt.sum(1)
    res = {"model": str(mdir), **prep.header(dev, amp), "tasks": summarize(items, nll)}
    if out:
        write_json_atomic(out, res)
    return res
