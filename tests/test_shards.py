import numpy as np
import pytest

from elmforest.data.readers import iter_documents
from elmforest.data.shards import Shards, token_dtype
from elmforest.data.shards_build import build_shards
from elmforest.data.splits import SplitSpec
from elmforest.data.tokenizer import load_tokenizer
from elmforest.utils.errors import UserError


def test_shards_equal_direct_tokenization(corpus, tokenizer_dir, shards_dir):
    tok = load_tokenizer(tokenizer_dir)
    spec = SplitSpec(0.1, 0.1)
    sh = Shards(shards_dir)
    assert sh.tokenizer_fingerprint == tok.fingerprint()
    assert sh.dtype == np.uint16
    expected: dict[tuple[str, str], list[int]] = {}
    nbytes: dict[tuple[str, str], list[int]] = {}
    for d in iter_documents(corpus):
        key = (d.domain, spec.assign(d.id))
        expected.setdefault(key, []).extend(tok.encode_batch([d.text])[0] + [tok.eos_id])
        nbytes.setdefault(key, []).append(len(d.text.encode("utf-8")))
    assert {k[0] for k in expected} == set(sh.domains)
    for (domain, split), ids in expected.items():
        assert sh.tokens(domain, split).tolist() == ids
        docs = sh.documents(domain, split)
        assert docs[:, 1].tolist() == nbytes[(domain, split)]
        assert docs[-1, 0] == len(ids)
        # each document's slice ends with EOS and decodes back to its text
        ends = docs[:, 0]
        assert all(sh.tokens(domain, split)[e - 1] == tok.eos_id for e in ends)
        info = sh.info(domain, split)
        assert info["tokens"] == len(ids) and info["bytes"] == sum(nbytes[(domain, split)])
    assert {s for (_, s) in expected} == {"train", "valid", "test"}


def test_an_unknown_domain_is_named_as_such_not_as_a_missing_split(shards_dir):
    from elmforest.utils.errors import NotFound

    sh = Shards(shards_dir)
    with pytest.raises(NotFound, match=r"no domain 'nosuch'; it has \["):
        sh.info("nosuch", "test")
    assert sh.info(sh.domains[0], "test")["tokens"] > 0


def test_split_assignment_is_stable_and_proportional():
    spec = SplitSpec(0.1, 0.2)
    ids = [f"doc-{i}" for i in range(20_000)]
    a = [spec.assign(i) for i in ids]
    assert a == [spec.assign(i) for i in ids]
    assert abs(a.count("test") / len(a) - 0.2) < 0.015
    assert abs(a.count("valid") / len(a) - 0.1) < 0.015
    with pytest.raises(ValueError, match="bad split fractions"):
        SplitSpec(0.6, 0.5)


def test_a_split_by_file_keeps_each_files_chunks_together_and_plain_ids_as_they_were():
    """Out-of-domain sets split by source file: every chunk FILE#N of a file lands where FILE hashes,
    so a prior never reads the neighbours of the chunks it is tested on; an id without "#" splits as
    it always did."""
    by_file, by_doc = SplitSpec(0.5, 0.5, by_file=True), SplitSpec(0.5, 0.5)
    files = [f"perl/lib{i}.pm" for i in range(200)]
    for f in files:
        assert {by_file.assign(f"{f}#{k:04d}") for k in range(12)} == {by_file.assign(f)}
    sides = [by_file.assign(f) for f in files]
    assert 70 < sides.count("valid") < 130 and set(sides) == {"valid", "test"}
    assert [by_file.assign(f) for f in files] == [by_doc.assign(f) for f in files]
    # only a trailing chunk number is a chunk: ids such as "c#:3" (a file c#.jsonl) stay documents
    assert [by_file.assign(f"c#:{i}") for i in range(50)] == [by_doc.assign(f"c#:{i}") for i in range(50)]
    assert by_file.assign("notes#a") == by_doc.assign("notes#a")
    # split by document, the chunks of a file fall on both sides
    assert sum(len({by_doc.assign(f"{f}#{k:04d}") for k in range(12)}) == 2 for f in files) > 150


def test_existing_output_is_refused_unless_overwrite(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "s"
    build_shards(corpus, tokenizer_dir, out, progress=False)
    with pytest.raises(FileExistsError):
        build_shards(corpus, tokenizer_dir, out, progress=False)
    build_shards(corpus, tokenizer_dir, out, overwrite=True, progress=False)
    assert Shards(out).domains and not list(tmp_path.glob(".s.tmp-*"))


def test_the_current_folder_as_the_output(corpus, tokenizer_dir, tmp_path, monkeypatch):
    """`--out .` in an empty folder (a traceback before: '.' has no name to stage a sibling by)."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    build_shards(corpus, tokenizer_dir, ".", overwrite=True, progress=False)
    assert Shards(tmp_path / "here").domains and not list(tmp_path.glob(".here.tmp*"))


def test_a_source_given_twice_is_refused(corpus, tokenizer_dir, tmp_path):
    """Each of its documents would be read twice (an out-of-domain set passed twice, --data a --data a)."""
    (tmp_path / "link").symlink_to(corpus)  # the same folder by another name
    with pytest.raises(UserError, match="given twice"):
        build_shards([corpus, tmp_path / "link"], tokenizer_dir, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_failed_build_leaves_nothing(tmp_path, tokenizer_dir):
    (tmp_path / "data.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="no usable documents"):
        build_shards(tmp_path / "data.jsonl", tokenizer_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_dtype_by_vocab_size():
    assert token_dtype(50_000) == np.uint16
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


def test_overwrite_refuses_a_folder_that_is_not_shards(corpus, tokenizer_dir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a shards directory"):
        build_shards(corpus, tokenizer_dir, precious, overwrite=True, progress=False)
    assert (precious / "thesis.txt").read_text() == "do not delete"


def test_domain_folder_names_never_collide(tmp_path, tokenizer_dir):
    import json

    with open(tmp_path / "d.jsonl", "w") as f:
        for i, dom in enumerate(
            ["Legal", "legal", "index.json", "a/b", "a_b", "vocab.json", "merges.txt"] * 3
        ):
            f.write(json.dumps({"id": f"{i}", "domain": dom, "text": f"text number {i} of {dom}"}) + "\n")
    sh = Shards(
        build_shards(tmp_path / "d.jsonl", tokenizer_dir, tmp_path / "s", SplitSpec(0, 0), progress=False).out
    )
    folders = [sh.index["domains"][d]["folder"].casefold() for d in sh.domains]
    assert len(set(folders)) == 7  # none may take the name of a tokenizer file a checkpoint can ship
    assert not {"index.json", "vocab.json", "merges.txt"} & set(folders)
    assert all(sh.info(d, "train")["documents"] == 3 for d in sh.domains)


def test_hundreds_of_domains_build_under_a_low_open_file_limit(tmp_path, tokenizer_dir, monkeypatch):
    """A build held two open files per (domain, split): ~340 domains hit the default 1024 limit."""
    import json
    import resource

    from elmforest.data import shards_build as shards_mod

    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(900):
            f.write(
                json.dumps({"id": f"{i}", "domain": f"dom{i % 300}", "text": f"text {i} " * (i % 7 + 1)})
                + "\n"
            )
    monkeypatch.setattr(shards_mod._Writer, "FLUSH_BYTES", 1 << 30)  # never full on its own:
    monkeypatch.setattr(shards_mod, "PENDING_BYTES", 64)  # all written when they hold 64 bytes together
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(128, hard), hard))
    try:
        out = build_shards(
            tmp_path / "d.jsonl", tokenizer_dir, tmp_path / "s", SplitSpec(0.1, 0.1), progress=False
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    sh, tok, spec = Shards(out.out), load_tokenizer(tokenizer_dir), SplitSpec(0.1, 0.1)
    assert len(sh.domains) == 300
    expected: dict[tuple[str, str], list[int]] = {}
    for d in iter_documents(tmp_path / "d.jsonl"):
        expected.setdefault((d.domain, spec.assign(d.id)), []).extend(
            tok.encode_batch([d.text])[0] + [tok.eos_id]
        )
    assert all(sh.tokens(dom, split).tolist() == ids for (dom, split), ids in expected.items())


def test_held_out_text_that_is_also_training_text_is_counted_and_said(tokenizer_dir, tmp_path, capsys):
    """The split hashes ids: the same text under two ids (two domains) can be trained on and scored as
    held out. The build says so and records it, checked against a brute-force count."""
    import json

    texts = [f"document number {i} about topic {i % 7}" for i in range(120)]
    rows = [{"id": f"{d}-{i}", "domain": d, "text": t} for d in ("a", "b") for i, t in enumerate(texts)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = SplitSpec(valid_frac=0.1, test_frac=0.1)
    build_shards(tmp_path / "c.jsonl", tokenizer_dir, tmp_path / "s", split=spec, progress=False)
    side = {(r["domain"], spec.assign(r["id"])): [] for r in rows}
    for r in rows:
        side[(r["domain"], spec.assign(r["id"]))].append(r["text"])
    train = {t for (_, s), ts in side.items() if s == "train" for t in ts}
    want = {}
    for (d, s), ts in side.items():
        if s != "train" and (hit := [t for t in ts if t in train]):
            want.setdefault(d, {})[s] = {"documents": len(hit), "bytes": sum(len(t.encode()) for t in hit)}
    sh = Shards(tmp_path / "s")
    assert want and sh.index["in_train"] == want
    assert "are also training text" in capsys.readouterr().err
    index = {k: v for k, v in sh.index.items() if k != "in_train"}  # derived: not part of the identity
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    assert Shards(tmp_path / "s").fingerprint == sh.fingerprint
