"""The out-of-domain sets of a comparison, tokenized apart from the training shards with the same
tokenizer: half of each set's files give the forests' prior, half are scored, and no model trains on
them. A set is refused where it is not out of domain (named like a training domain, or mostly the
training corpus's text under another name), and where two sources hold one name (scored as one set)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from elmforest.data.shards import Shards
from elmforest.data.shards_build import build_shards
from elmforest.data.splits import SplitSpec
from elmforest.data.tokenizer import load_tokenizer
from elmforest.utils.errors import UserError
from elmforest.utils.io import file_stamps, read_json, write_json_atomic

# no model trains on these: half prior, half test, each source file's chunks on one side (data/splits.py)
OOD_SPLIT = SplitSpec(valid_frac=0.5, test_frac=0.5, by_file=True)
SOURCES = "sources.json"  # beside out-of-domain shards: what they were built from


def ood_stamp(path: Path | str | None) -> dict | None:
    """What an out-of-domain shards directory was built from and how it was split (`build_ood_shards` writes
    it): a score made on other out-of-domain halves is stale, so score caches key on this."""
    f = Path(path) / SOURCES if path is not None else None
    return read_json(f) if f is not None and f.is_file() else None


def build_ood_shards(
    path: Path,
    sources: list[Path],
    tok_dir: Path,
    train_names: list[str],
    progress,
    corpus: Path | None = None,
) -> Shards:
    """The out-of-domain sets tokenized once (half valid for the priors, half test, by source file);
    rebuilt when the sources change (their list, or any file's size or mtime: a rebuilt evaluation-only
    corpus or an edited --ood file) or were split otherwise (before the split was by file). A set named
    like a training domain is refused: it would not be OOD; so is one whose documents are mostly the
    training corpus's (the same text under another domain name), and a few such documents are said; so
    is a name two sources hold."""
    want = [str(s.resolve()) for s in sources]
    # the split too: a study's scores keyed by this stamp are then scored again on the new halves
    stamp = {"sources": want, "files": file_stamps(sources), "split": asdict(OOD_SPLIT)}
    tok = load_tokenizer(tok_dir)
    sh = Shards(path) if Shards.is_shards_dir(path) else None
    seen = ood_stamp(path)
    if (
        sh is None
        or {k: (seen or {}).get(k) for k in stamp} != stamp
        or sh.tokenizer_fingerprint != tok.fingerprint()
    ):
        found, shared = scan_ood_sources(corpus, sources, train_names)
        check_ood_names(found, train_names)  # before anything is tokenized
        build_shards(sources, tok, path, OOD_SPLIT, overwrite=True, progress=progress)
        write_json_atomic(path / SOURCES, {**stamp, "shared_with_training": shared})
        sh, seen = Shards(path), {"shared_with_training": shared}
    for name, (n, of) in (seen.get("shared_with_training") or {}).items():
        if 2 * n > of:
            raise UserError(
                f"out-of-domain set {name}: {n} of its {of} documents are documents of the training corpus (the "
                "same text): it is not out of domain"
            )
        print(
            f"note: out-of-domain set {name}: {n} of its {of} documents are also in the training corpus (the "
            "same text); its BPB is not wholly out of domain",
            file=sys.stderr,
        )
    check_ood_names(sh.domains, train_names)
    for name in sh.domains:  # split by source file, a set of one or two files can fall on one side
        missing = [s for s in ("valid", "test") if not sh.has(name, s)]
        if missing:
            print(
                f"note: out-of-domain set {name} has no {' and no '.join(missing)} documents (split half and "
                "half by source file, ids FILE#N; too few files or documents?): "
                + ("it is not scored" if "test" in missing else "the forests' prior for it is uniform"),
                file=sys.stderr,
            )
    return sh


def check_ood_names(ood_names, train_names) -> None:
    """An out-of-domain set named like a training domain is refused (`study --dry-run` checks it too)."""
    clash = sorted(set(ood_names) & set(train_names))
    if clash:
        raise UserError(
            f"out-of-domain set(s) {clash} share a name with a training domain; rename them (the `domain` "
            "field or the file name): a domain the experts trained on is not out of domain"
        )


def scan_ood_sources(
    corpus: Path | None, sources: list[Path], names: list[str]
) -> tuple[list[str], dict[str, list[int]]]:
    """One read of the out-of-domain sources: (the set names they hold, and with the training `corpus`
    {OOD set: [documents whose text is a document of a training domain, documents]} for the sets with
    any; only the domains trained on, `names`: a domain left out with --domains is a fair OOD set).
    Refuses a set name two sources hold (a user's `--ood mine/perl_code.jsonl` beside the demo's own
    perl_code, `A/news.jsonl` and `B/news.jsonl`: built together they were one row, silently)."""
    from elmforest.data.documents import text_key as key
    from elmforest.data.readers import iter_documents, quiet_notes

    where: dict[str, list[str]] = {}
    texts: dict[str, list[bytes]] = {}
    with quiet_notes():  # the build that follows says them (the corpus's: its shards' build did)
        for src in sources:
            for d in iter_documents(src):
                if str(src) not in (w := where.setdefault(d.domain, [])):
                    w.append(str(src))
                texts.setdefault(d.domain, []).append(key(d.text))
    if clash := {n: s for n, s in where.items() if len(s) > 1}:
        said = "; ".join(f"{n} in {' and '.join(s)}" for n, s in sorted(clash.items()))
        raise UserError(
            f"out-of-domain sets of the same name from more than one source ({said}): they would be scored "
            "as one set; rename one (the `domain` field or the file name)"
        )
    if corpus is None:
        return list(where), {}
    keep = set(names)
    with quiet_notes():
        train = {key(d.text) for d in iter_documents(corpus) if d.domain in keep}
    counts = {name: [sum(k in train for k in ks), len(ks)] for name, ks in texts.items()}
    return list(where), {name: c for name, c in counts.items() if c[0]}
