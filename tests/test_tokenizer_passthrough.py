"""A seed's tokenizer reaches every expert, average and merge unchanged, and training ids equal what
`AutoTokenizer` of each exported checkpoint produces (issue 11: "your checkpoint stays yours")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_corpus, tiny_config
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from elmforest.data.readers import iter_documents
from elmforest.data.shards import Shards
from elmforest.data.shards_build import build_shards
from elmforest.data.splits import SplitSpec
from elmforest.data.tokenizer import load_tokenizer
from elmforest.utils.errors import UserError

SPEC = SplitSpec(0.1, 0.1)
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
# every file a seed here ships; each must reach every output byte for byte, and no other may appear
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
FILES += ("vocab.json", "merges.txt")


def _texts(corpus: Path) -> list[str]:
    return [d.text for d in iter_documents(corpus)]


def _llama_tokenizer(texts: list[str], append_eos: bool = False) -> Tokenizer:
    """Llama-2 style: SentencePiece-like BPE with byte fallback, <unk>=0 <s>=1 </s>=2, BOS prepended."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    )
    single = "<s> $A </s>" if append_eos else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair="<s> $A <s> $B", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return tok


def _opt_tokenizer(texts: list[str]) -> Tokenizer:
    """OPT style: GPT-2 byte-level BPE, <s>=0 <pad>=1 </s>=2, `</s>` is BOS and EOS and is prepended."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    return tok


LLAMA_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "model_max_length": 2048,
    "clean_up_tokenization_spaces": False,
}
OPT_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "bos_token": "</s>",
    "eos_token": "</s>",
    "unk_token": "</s>",
    "pad_token": "<pad>",
    "add_bos_token": True,
    "add_prefix_space": False,
    "errors": "replace",
    "model_max_length": 1000000000000000019884624838656,
}


def _write_checkpoint(d: Path, tok: Tokenizer, tok_config: dict, ids: dict, chat_template: bool) -> Path:
    """A tiny HF checkpoint (Llama weights) whose tokenizer files are written by hand, as a hub repo ships them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d.mkdir(parents=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    special = {k: v for k, v in tok_config.items() if k.endswith("_token") and v is not None}
    (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    if chat_template:
        (d / "chat_template.jinja").write_text(TEMPLATE)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        **ids,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("pt-corpus"), docs_per_domain=16, seed=3)


@pytest.fixture(scope="module")
def seeds(small_corpus, tmp_path_factory) -> dict[str, Path]:
    texts, root = _texts(small_corpus), tmp_path_factory.mktemp("seeds")
    llama_ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    opt_ids = {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}
    return {
        "llama": _write_checkpoint(root / "llama", _llama_tokenizer(texts), LLAMA_CONFIG, llama_ids, True),
        "opt": _write_checkpoint(root / "opt", _opt_tokenizer(texts), OPT_CONFIG, opt_ids, False),
    }


def _tokenizer_files(d: Path) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in FILES if (d / n).is_file()}


def _first_documents(corpus: Path, shards: Shards, split: str = "train") -> dict[str, tuple[str, list[int]]]:
    """domain -> (text, ids stored in the shards) of each domain's first document in `split`."""
    out = {}
    for d in iter_documents(corpus):
        if d.domain in out or SPEC.assign(d.id) != split:
            continue
        end = int(shards.documents(d.domain, split)[0, 0])
        out[d.domain] = (d.text, shards.tokens(d.domain, split)[:end].tolist())
    return out


@pytest.mark.parametrize("style", ["llama", "opt"])
def test_seed_tokenizer_reaches_every_output_unchanged(style, seeds, small_corpus, tmp_path):
    from elmforest.forest import btm
    from elmforest.forest.manifest import Forest
    from elmforest.merge.average import average_checkpoints
    from elmforest.merge.moe import MoeSpec, export_moe
    from elmforest.merge.moe_train import train_router

    seed = seeds[style]
    want = _tokenizer_files(seed)
    assert set(want) >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    shards = Shards(build_shards(small_corpus, seed, tmp_path / "shards", SPEC, progress=False).out)

    forest = Forest.init(tmp_path / "forest")
    btm.seed_from_checkpoint(forest, seed)
    base = tiny_config(shards.root, steps=2, batch_size=2)
    names = shards.domains[:2]
    for domain in names:
        btm.train_expert(forest, shards, domain, base=base, progress=False)
    avg = average_checkpoints([forest.expert_dir(n) for n in names], tmp_path / "avg")
    moe = export_moe(forest, tmp_path / "moe", MoeSpec(top_k=2, sample_tokens=128), device="cpu")
    routed = train_router(
        moe, shards.root, steps=2, out=tmp_path / "routed", batch_size=2, progress=False, device="cpu"
    )

    outputs = {
        "shards": shards.root,
        "forest seed": forest.seed_dir,
        "run": tmp_path / "forest" / "runs" / names[0] / "model",
        **{f"expert {n}": forest.expert_dir(n) for n in names},
        "average": avg,
        "moe": moe,
        "router-trained moe": routed,
    }
    for what, d in outputs.items():
        assert _tokenizer_files(Path(d)) == want, f"{what}: tokenizer files differ from the seed's"
        assert load_tokenizer(d).fingerprint() == shards.tokenizer_fingerprint, what

    ref = AutoTokenizer.from_pretrained(str(seed))
    docs = _first_documents(small_corpus, shards)
    for what in ("run", f"expert {names[0]}", "average", "moe", "router-trained moe"):
        hf = AutoTokenizer.from_pretrained(str(outputs[what]))
        assert (hf.bos_token, hf.eos_token, hf.unk_token, hf.pad_token) == (
            ref.bos_token,
            ref.eos_token,
            ref.unk_token,
            ref.pad_token,
        ), what
        for text, stored in docs.values():
            assert stored[-1] == shards.eos_id
            assert hf(text)["input_ids"] == stored[:-1], what
    bos = {"llama": 1, "opt": 2}[style]
    assert all(stored[0] == bos for _, stored in docs.values())  # the BOS the model trains on
    assert json.loads((Path(forest.expert_dir(names[0])) / "config.json").read_text())["bos_token_id"] == bos


def test_post_processor_eos_is_not_doubled(small_corpus, tmp_path):
    """A tokenizer that ends every sequence with EOS itself: documents end with exactly one EOS."""
    tok = _llama_tokenizer(_texts(small_corpus), append_eos=True)
    seed = _write_checkpoint(
        tmp_path / "seed",
        tok,
        {**LLAMA_CONFIG, "add_eos_token": True},
        {"bos_token_id": 1, "eos_token_id": 2},
        False,
    )
    shards = Shards(build_shards(small_corpus, seed, tmp_path / "shards", SPEC, progress=False).out)
    hf = AutoTokenizer.from_pretrained(str(seed))
    for text, stored in _first_documents(small_corpus, shards).values():
        assert hf(text)["input_ids"] == stored
        assert stored[-1] == 2 and stored[-2] != 2


def test_slow_only_tokenizer_is_copied_verbatim(seeds, small_corpus, tmp_path):
    """A checkpoint with only vocab.json/merges.txt: its files travel as they are, ids match AutoTokenizer."""
    src = json.loads((seeds["opt"] / "tokenizer.json").read_text())
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        (slow / name).write_bytes((seeds["opt"] / name).read_bytes())
    (slow / "vocab.json").write_text(json.dumps(src["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in src["model"]["merges"]]
    (slow / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    want = _tokenizer_files(slow)
    shards = Shards(build_shards(small_corpus, slow, tmp_path / "shards", SPEC, progress=False).out)
    assert _tokenizer_files(shards.root) == want
    assert load_tokenizer(shards.root).fingerprint() == load_tokenizer(slow).fingerprint()
    hf = AutoTokenizer.from_pretrained(str(slow))
    for text, stored in _first_documents(small_corpus, shards).values():
        assert hf(text)["input_ids"] == stored[:-1] and stored[0] == 2


def test_old_shards_that_dropped_special_tokens_are_refused(seeds, small_corpus, tokenizer_dir, tmp_path):
    """Shards written before the encoding was recorded held no BOS: refuse them when the tokenizer adds one."""
    for src, refused in ((seeds["llama"], True), (tokenizer_dir, False)):
        out = tmp_path / src.name
        build_shards(small_corpus, src, out, SPEC, progress=False)
        index = json.loads((out / "index.json").read_text())
        index["tokenizer"].pop("encoding", None)
        (out / "index.json").write_text(json.dumps(index))
        if refused:
            with pytest.raises(UserError, match="rebuild the shards with --overwrite"):
                Shards(out)
        else:  # elmforest's own BPE adds nothing: old shards stay valid
            assert Shards(out).domains
