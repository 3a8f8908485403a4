"""The cross-document tasks (issue 17, In-Context Pretraining): what a model gains from text before a
document, built from a shards directory.

- `retrieval`: a test document's first T tokens (T = seq_len // 2 by default; the whole document, with
  its EOS, if it is shorter), after a context of its nearest *train* documents (of every domain), the
  most similar last, so nearest the target. Controls on the very same targets: `random` (a context of
  random train documents, exactly as many tokens) and `none` (the target alone, after the leading EOS,
  as ordinary BPB starts a document). BPB(random) − BPB(retrieved) is the gain from *related* text,
  apart from the gain of any text before the target.
- `second_half`: the tokens [h, seq_len) of a test document at least seq_len tokens long (h =
  seq_len // 2), after its own tokens [0, h) (`first_half`) or alone (`none`).

Retrieval is tf-idf cosine over bags of token ids (the first 512 tokens of each document, special
tokens such as EOS left out), sklearn's TfidfTransformer fitted on the train documents only, with exact
sparse dot products, test × train, a chunk of queries at a time (never a dense N × N matrix). The
query is the target itself (its first 512 tokens): retrieval sees exactly the text being scored and
nothing of the document beyond it. Neighbours with cosine ≥ `max_cosine` (0.9) are left out: a near
copy would measure copying, not the use of related text (ICP drops those from training too); so are
those with cosine 0 (nothing in common). The cosine compares bags of different lengths (the target's
T tokens, a neighbour's 512), so a whole copy of a document can stay below 0.9: a context document is
also left out when the tokens it brings hold more than 20% of the target's token 8-grams (counted
per domain as `copies_left_out`; random contexts are filtered the same way). Each neighbour brings at most its first min(512, seq_len − T
− 1) tokens (the part the retrieval matched: a long neighbour is cut at its end, never its beginning,
so even the nearest one alone starts at its start), then EOS; the concatenation is cut from the left
to seq_len − T tokens. Random contexts are made the same way from uniformly drawn
train documents. Test documents are drawn per domain by a seed (at most `max_docs`); the valid and
test splits are never in a context.

Bytes: a partial document's bytes are the sum of its tokens' UTF-8 lengths, from the byte-level BPE
vocabulary (each token's characters mapped back to bytes by the ByteLevel alphabet; special tokens
0 bytes: they stand for no text). The table is checked on every test document: its tokens' bytes must
sum to the bytes the shards recorded. A document holding a special token inside it (its text
literally contains, say, "<|endoftext|>") cannot match and is skipped and counted; any other mismatch
means the table is wrong (a normalizer, not byte-level) and is an error. A target that is a whole
document includes its EOS, predicted and counted as 1 byte, exactly as eval/bpb.py counts it; a
partial one has no EOS and no extra byte.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from elmforest.data.shards import Shards
from elmforest.utils.errors import UserError

BAG_TOKENS = 512  # tokens of a document in its tf-idf bag, and the most a neighbour brings to a context
COPY_GRAM = 8  # token n-grams compared to find copies of a target in a context document
MAX_OVERLAP = 0.2  # a context document holding more of the target's n-grams is a copy, left out
MIN_SEQ_LEN = 8
TASKS = {"retrieval": ("retrieved", "random", "none"), "second_half": ("first_half", "none")}
RANDOM_TRIES = 6  # draws for a random context, doubled each try: 63x the budget's in all


def _has_bytelevel(node) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_has_bytelevel(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_bytelevel(v) for v in node)
    return False


def token_byte_table(tokenizer_json: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes of each token id, the ids of special tokens); refuses a tokenizer that is not a
    byte-level BPE, whose tokens' bytes cannot be read off the vocabulary."""
    path = Path(tokenizer_json)
    if not path.is_file():
        raise UserError(f"{path}: no tokenizer.json: cross-document BPB needs a byte-level BPE tokenizer")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not (
        _has_bytelevel(spec.get("pre_tokenizer")) or _has_bytelevel(spec.get("decoder"))
    ):
        raise UserError(
            f"{path}: not a byte-level BPE tokenizer (model {model.get('type')!r}, no ByteLevel pre-tokenizer "
            "or decoder): the bytes of part of a document cannot be read off its tokens"
        )
    # GPT-2's byte -> printable character table, in which byte-level BPE spells its tokens: transformers'
    # own, as cluster/router.py reads it (tokenizers exposes only the set of characters, not the mapping)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    back = {c: b for b, c in bytes_to_unicode().items()}
    added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
    vocab = model.get("vocab") or {}
    size = max([*vocab.values(), *added, -1]) + 1
    table = np.full(size, -1, dtype=np.int64)
    for tok, i in vocab.items():
        if i in added:
            continue
        if any(c not in back for c in tok):
            raise UserError(f"{path}: token {tok!r} (id {i}) is not in the ByteLevel alphabet")
        table[i] = len(tok)  # one alphabet character per byte
    for i, a in added.items():
        table[i] = 0 if a.get("special") else len(a["content"].encode("utf-8"))
    special = np.array(sorted(i for i, a in added.items() if a.get("special")), dtype=np.int64)
    return table, special


def document_bytes_ok(shards: Shards, domain: str, split: str, table: np.ndarray, special) -> np.ndarray:
    """Per document of the split: whether its tokens' bytes sum to the recorded bytes (False only for a
    document holding a special token inside it; any other mismatch is an error)."""
    docs = shards.documents(domain, split)
    stream = np.asarray(shards.tokens(domain, split), dtype=np.int64)
    if stream.size and int(stream.max()) >= len(table):
        raise UserError(f"{shards.root}: token id {int(stream.max())} is beyond the tokenizer's vocabulary")
    starts = np.concatenate([[0], docs[:-1, 0]]).astype(np.int64)
    per_tok = table[stream]
    if (per_tok < 0).any():
        raise UserError(f"{shards.root}: {domain}/{split} holds token ids missing from the tokenizer")
    sums = np.add.reduceat(per_tok, starts) if len(docs) else np.zeros(0, np.int64)
    ok = sums == docs[:, 1]
    is_special = np.isin(stream, special)
    for i in np.flatnonzero(~ok):
        inner = is_special[starts[i] : docs[i, 0] - 1]  # from its first token: a text may start with one
        if not inner.any():
            raise UserError(
                f"{shards.root}: {domain}/{split} document {i}: its tokens hold {int(sums[i])} bytes but the "
                f"shards recorded {int(docs[i, 1])}: the tokenizer's byte table is wrong (a normalizer?)"
            )
    return ok


def _bags(stream: np.ndarray, starts: np.ndarray, ends: np.ndarray, vocab: int, special) -> sp.csr_matrix:
    """Token-id counts [docs, vocab] of each [start, end) cut to its first BAG_TOKENS tokens, special
    tokens left out: ICP's bags of token ids (cluster/icp_embed.py), over spans that need not tile the
    stream (a query is the first tokens of a document). Imported here: icp_embed loads scikit-learn's
    text module, which a second_half-only run never needs."""
    from elmforest.cluster.icp_embed import bag_counts

    lengths = np.minimum(ends - starts, BAG_TOKENS).clip(0)
    pos = np.arange(lengths.sum()) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    ids = np.asarray(stream[pos], dtype=np.int64)
    if ids.size and int(ids.max()) >= vocab:
        raise UserError(f"token id {int(ids.max())} is beyond the shards' vocabulary of {vocab}")
    ids[np.isin(ids, special)] = -1
    return bag_counts(lengths, ids, vocab)


@dataclass
class TrainIndex:
    """Every train document of the shards (all domains): where its tokens are, and its tf-idf vector."""

    streams: list[np.ndarray]  # per domain
    where: np.ndarray  # [n, 3]: domain index, start, end (end past the document's EOS)
    vectors: sp.csr_matrix  # [n, vocab], rows L2-normalised
    transformer: object = field(repr=False)

    @classmethod
    def build(cls, shards: Shards, special) -> TrainIndex:
        from sklearn.feature_extraction.text import TfidfTransformer

        streams, where, bags = [], [], []
        for d in [d for d in shards.domains if shards.has(d, "train")]:
            docs = shards.documents(d, "train")
            s = shards.tokens(d, "train")
            ends = docs[:, 0].astype(np.int64)
            starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
            where.append(np.stack([np.full(len(ends), len(streams)), starts, ends], 1))
            bags.append(_bags(s, starts, ends, shards.vocab_size, special))
            streams.append(s)
        if not streams:
            raise UserError(f"{shards.root}: no train documents to retrieve neighbours from")
        tf = TfidfTransformer().fit(sp.vstack(bags))
        return cls(streams, np.concatenate(where), tf.transform(sp.vstack(bags)).tocsr(), tf)

    def __len__(self) -> int:
        return len(self.where)

    def neighbours(self, queries: sp.csr_matrix, k: int, max_cosine: float, chunk_cells: int = 1 << 24):
        """(ids [q, k], cosines [q, k]) of each query's k most similar train documents, best first, with
        0 < cosine < max_cosine; -1 (cosine 0) where fewer qualify. Exact: sparse products, a chunk of
        queries at a time, at most `chunk_cells` similarities held at once."""
        q = self.transformer.transform(queries).tocsr()
        vt = self.vectors.T.tocsc()
        n, k = len(self), min(k, len(self))
        ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        cos = np.zeros((q.shape[0], k))
        step = max(1, chunk_cells // max(n, 1))
        for lo in range(0, q.shape[0], step):
            sims = (q[lo : lo + step] @ vt).toarray()
            sims[(sims >= max_cosine) | (sims <= 0)] = -np.inf
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(sims, top, 1)
            order = np.argsort(-vals, axis=1, kind="stable")
            top, vals = np.take_along_axis(top, order, 1), np.take_along_axis(vals, order, 1)
            good = np.isfinite(vals)
            ids[lo : lo + step] = np.where(good, top, -1)
            cos[lo : lo + step] = np.where(good, vals, 0.0)
        return ids, cos

    def doc_tokens(self, i: int, limit: int) -> np.ndarray:
        """Train document i's first `limit` content tokens, then EOS (its own last token)."""
        dom, s, e = self.where[i]
        toks = np.asarray(self.streams[dom][s:e], dtype=np.int64)
        return np.concatenate([toks[: min(len(toks) - 1, limit)], toks[-1:]])

    def context(self, ids, budget: int, limit: int, target=None) -> tuple[np.ndarray, list[int], int]:
        """The documents `ids` (best first; -1 ends them) laid out best last, cut from the left to
        `budget` tokens; the ids it holds (even in part); how many were left out as copies of
        `target` (more than MAX_OVERLAP of its COPY_GRAM-grams in the tokens the document brings)."""
        grams = _grams(target) if target is not None else None
        parts, held, n, copies = [], [], 0, 0
        for i in ids:
            if i < 0 or n >= budget:
                break
            toks = self.doc_tokens(int(i), limit)
            if grams is not None and grams.size and np.isin(grams, _grams(toks)).mean() > MAX_OVERLAP:
                copies += 1
                continue
            parts.append(toks)
            held.append(int(i))
            n += len(toks)
        if not parts:
            return np.zeros(0, dtype=np.int64), held, copies
        return np.concatenate(parts[::-1])[-budget:], held, copies


def _grams(tokens: np.ndarray) -> np.ndarray:
    """Hashes of the token COPY_GRAM-grams (a polynomial in uint64, wrapping): equal n-grams, equal hashes."""
    t = np.asarray(tokens, dtype=np.uint64)
    if len(t) < COPY_GRAM:
        return t[:0]
    w = np.lib.stride_tricks.sliding_window_view(t, COPY_GRAM)
    powers = np.uint64(1_000_003) ** np.arange(COPY_GRAM, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return (w * powers).sum(axis=1, dtype=np.uint64)


@dataclass
class Item:
    """One target and its contexts, one per condition of its task ("none": no context)."""

    domain: str
    doc: int  # row of the domain's test documents table
    target: np.ndarray
    nbytes: int
    contexts: dict[str, np.ndarray]


def pick_docs(domain: str, eligible: np.ndarray, max_docs: int | None, seed: int) -> np.ndarray:
    """At most `max_docs` of the eligible document rows, drawn by the seed and the domain's name (so
    adding a domain changes no other domain's draw), in their order in the split."""
    if max_docs is None or len(eligible) <= max_docs:
        return eligible
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    return np.sort(rng.choice(eligible, max_docs, replace=False))


def build_tasks(
    shards: Shards,
    seq_len: int,
    target_len: int | None = None,
    max_docs: int | None = 200,
    seed: int = 0,
    tasks: tuple[str, ...] = tuple(TASKS),
    neighbours: int = 64,
    max_cosine: float = 0.9,
    domains: list[str] | None = None,
) -> tuple[dict[str, list[Item]], dict]:
    """The items of each task, and what was built (documents, skipped ones, neighbour similarities)."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        what = f"unknown task(s) {unknown}" if unknown else "no task given"
        raise UserError(f"{what}; expected some of {list(TASKS)}")
    if seq_len < MIN_SEQ_LEN:
        raise UserError(f"seq_len must be at least {MIN_SEQ_LEN} (a context and a target), got {seq_len}")
    t_len = seq_len // 2 if target_len is None else target_len
    if not 1 <= t_len < seq_len:
        raise UserError(f"target_len must be in [1, seq_len - 1 = {seq_len - 1}], got {t_len}")
    if "retrieval" in tasks and t_len > seq_len - 2:  # a context of its leading EOS alone: nothing measured
        raise UserError(
            f"target_len {t_len} leaves the retrieval task's context no room for a neighbour's text "
            f"(at most seq_len - 2 = {seq_len - 2})"
        )
    if not 0 < max_cosine <= 1:
        raise UserError(f"max_cosine must be in (0, 1], got {max_cosine}")
    table, special = token_byte_table(shards.root / "tokenizer.json")
    from elmforest.eval.bpb import missing_domains

    names, _ = missing_domains(shards, "test", domains)  # the left-out ones said, as eval says them
    if not names:
        raise UserError(f"{shards.root}: no domain has a 'test' split: nothing to score")
    strangers = sorted(set(names) - set(shards.domains))
    if strangers:
        raise UserError(f"{shards.root}: no domain(s) {strangers}; it has {shards.domains}")
    index = TrainIndex.build(shards, special) if "retrieval" in tasks else None
    out: dict[str, list[Item]] = {t: [] for t in tasks}
    info: dict = {"target_len": t_len, "train_documents": len(index) if index else None, "domains": {}}
    budget, h = seq_len - t_len, seq_len // 2
    limit = max(1, min(BAG_TOKENS, budget - 1))  # tokens a context document brings before its EOS
    for d in names:
        docs = shards.documents(d, "test")
        stream = shards.tokens(d, "test")
        ok = document_bytes_ok(shards, d, "test", table, special)
        ends = docs[:, 0].astype(np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        dinfo = info["domains"][d] = {"test_documents": len(docs), "skipped_special_inside": int((~ok).sum())}
        if "retrieval" in tasks:
            rng = np.random.default_rng([seed, zlib.crc32(d.encode()), 1])  # the random contexts' draw
            rows = pick_docs(d, np.flatnonzero(ok), max_docs, seed)
            targets = [
                np.asarray(stream[starts[i] : min(ends[i], starts[i] + t_len)], np.int64) for i in rows
            ]
            q_ends = np.array([starts[i] + len(t) for i, t in zip(rows, targets, strict=True)], np.int64)
            q = _bags(stream, starts[rows], q_ends, shards.vocab_size, special)
            nb, cos = index.neighbours(q, neighbours, max_cosine)
            used, copies, short = [], 0, 0
            for row, (i, tgt) in enumerate(zip(rows, targets, strict=True)):
                whole = len(tgt) == ends[i] - starts[i]
                nbytes = int(docs[i, 1]) + 1 if whole else int(table[tgt].sum())
                ctx, held, c = index.context(nb[row], budget, limit, tgt)
                copies += c
                used.append(cos[row][np.isin(nb[row], held)])
                # each document brings at least its EOS, so budget + 1 draws fill the budget, with a few
                # spare for copies of the target; a corpus of many copies takes more draws
                for more in range(RANDOM_TRIES):
                    draws = rng.integers(0, len(index), size=(len(ctx) + 1 + 8) << more)
                    rnd, _, _ = index.context(draws, len(ctx), limit, tgt)
                    if len(rnd) >= len(ctx):
                        break
                short += len(rnd) < len(ctx)
                out["retrieval"].append(
                    Item(d, int(i), tgt, nbytes, {"retrieved": ctx, "random": rnd, "none": ctx[:0]})
                )
            flat = np.concatenate(used) if used else np.zeros(0)
            ctx_lens = [len(x.contexts["retrieved"]) for x in out["retrieval"] if x.domain == d]
            dinfo["retrieval"] = {
                "documents": len(rows),
                "without_neighbours": int(sum(len(u) == 0 for u in used)),
                "copies_left_out": copies,
                "random_context_short": short,  # all but every train document a copy of the target
                "mean_neighbour_cosine": float(flat.mean()) if flat.size else None,
                "mean_neighbours_in_context": float(np.mean([len(u) for u in used])) if used else 0.0,
                "mean_context_tokens": float(np.mean(ctx_lens)) if ctx_lens else 0.0,
            }
        if "second_half" in tasks:
            long = np.flatnonzero(ok & (ends - starts - 1 >= seq_len))
            rows = pick_docs(d, long, max_docs, seed)
            for i in rows:
                doc = np.asarray(stream[starts[i] : starts[i] + seq_len], np.int64)
                tgt = doc[h:]
                out["second_half"].append(
                    Item(d, int(i), tgt, int(table[tgt].sum()), {"first_half": doc[:h], "none": doc[:0]})
                )
            dinfo["second_half"] = {"documents": len(rows), "long_enough": len(long)}
    return out, info


def skipped_note(res: dict) -> str | None:
    """Every task's: the test documents left out for a special token inside their text."""
    special = sum(
        d.get("skipped_special_inside", 0) for d in res.get("built", {}).get("domains", {}).values()
    )
    if special:
        return (
            f"{special} test document(s) hold a special token (<|endoftext|>) in their text and are left out "
            "of every condition (a document boundary cannot be scored as text)"
        )
    return None


def retrieval_notes(res: dict) -> list[str]:
    """What the retrieval table alone does not show. Targets with no neighbour get no context in any
    condition: they count toward every mean and pull the gain toward zero."""
    built = [d.get("retrieval") or {} for d in res.get("built", {}).get("domains", {}).values()]
    lonely, total = (
        sum(b.get("without_neighbours", 0) for b in built),
        sum(b.get("documents", 0) for b in built),
    )
    copies, short = (sum(b.get(k, 0) for b in built) for k in ("copies_left_out", "random_context_short"))
    out = []
    if lonely:
        why = "none other in the pool, or all past --max-cosine"
        if copies:  # the 8-gram rule can leave out every candidate of a corpus of near-copies
            why += f", or copies of the target: {copies} candidates were left out as copies; a larger --neighbours draws more"
        out.append(
            f"{lonely} of {total} retrieval targets had no neighbour to put in context ({why}): they are "
            "scored without context in every condition, so the gain is diluted"
            + (" (all of them: nothing was measured)" if lonely == total else "")
        )
    if short:
        out.append(
            f"for {short} retrieval target(s) the random context is shorter than the retrieved one (almost "
            "every training document is a copy of the target): random vs retrieved compares contexts of "
            "different lengths there"
        )
    return out
