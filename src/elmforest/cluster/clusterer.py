"""The c-BTM clusterer: tf-idf -> truncated SVD -> L2 normalisation -> balanced k-means.

Fitting uses scikit-learn (TfidfVectorizer, TruncatedSVD) on a sample of documents; everything the
clusterer needs afterwards is saved as plain data — `clusterer.json` (version, settings, the
vocabulary in column order, checksums) and `arrays.safetensors` (idf, SVD components, centres) —
never pickle, and the transform is our own code over those arrays, so a fresh process gives
identical embeddings and assignments.

Text analysis (shared with the incremental router): lower-case, words = runs of \\w, words shorter
than 2 characters and English stop words dropped, words starting with a digit mapped to one
number token. tf is sublinear (1 + ln tf). Because rows are L2-normalised after the SVD, the
tf-idf row's own norm cancels and need not be computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from elmforest.cluster.embedder import ClustererError, SentenceEmbedder
from elmforest.cluster.kmeans import assign_labels, balanced_kmeans, neg_sq_dist
from elmforest.utils.errors import UserError
from elmforest.utils.io import atomic_path, write_json_atomic

FORMAT = "elmforest-clusterer"
VERSION = 2  # v2: the checksum covers the vocabulary too; v1 files (arrays only) still load
READABLE = (1, 2)
WORD = re.compile(r"\w+")
NUMBER = "__number__"


def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


STOP_WORDS = _stop_words()


def normalise_word(w: str) -> str | None:
    """The term a word counts as, or None when it is dropped."""
    w = w.lower()
    if w[0].isdigit():
        return NUMBER
    if len(w) < 2 or w in STOP_WORDS:
        return None
    return w


def analyze(text: str) -> list[str]:
    return [t for t in (normalise_word(m) for m in WORD.findall(text)) if t is not None]


def _arrays_named(folder: Path) -> str | None:
    """The arrays file a clusterer already in `folder` names (None: none there, or unreadable)."""
    try:
        name = json.loads((folder / "clusterer.json").read_text())["arrays"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and Path(name).name == name and name not in (".", "..") else None


def _digest(arrays: bytes, vocabulary: list[str]) -> str:
    """Covers the arrays and the vocabulary's column order: either changing alone is caught."""
    return hashlib.sha256(arrays + json.dumps(vocabulary).encode("utf-8")).hexdigest()


@dataclass
class Clusterer:
    terms: list[str]
    idf: np.ndarray  # [V]
    components: np.ndarray  # [d, V]
    centres: np.ndarray  # [K, d]
    meta: dict = field(default_factory=dict)
    embedder: SentenceEmbedder | None = None  # instead of tf-idf + SVD, when given

    def __post_init__(self):
        # C order matters: safetensors writes an array's raw buffer, so a Fortran-ordered array (as
        # TruncatedSVD returns) would be saved scrambled under its C shape.
        self.idf, self.components, self.centres = (
            np.ascontiguousarray(a, dtype=np.float64) for a in (self.idf, self.components, self.centres)
        )
        self.vocab = {t: i for i, t in enumerate(self.terms)}
        v, d, k = len(self.terms), self.components.shape[0], self.centres.shape[0]
        if self.idf.shape != (v,) or self.components.shape != (d, v) or self.centres.shape != (k, d):
            raise ClustererError(
                f"inconsistent shapes: vocabulary {v}, idf {self.idf.shape}, components "
                f"{self.components.shape}, centres {self.centres.shape}"
            )
        # term -> its column of the projection, pre-scaled by idf: a word's whole contribution
        # (C order: a transposed view would make every sparse product copy the whole matrix)
        self.term_vectors = np.ascontiguousarray((self.components * self.idf[None, :]).T)  # [V, d]

    @property
    def k(self) -> int:
        return self.centres.shape[0]

    @property
    def dims(self) -> int:
        return self.centres.shape[1]

    # -- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        texts: list[str],
        k: int,
        dims: int = 100,
        min_df: int = 2,
        max_df: float = 1.0,
        max_features: int | None = 200_000,
        seed: int = 0,
        max_iter: int = 20,
        embedder: SentenceEmbedder | None = None,
        balance: str = "documents",
        sizes: list[int] | None = None,
    ) -> Clusterer:
        """balance="documents": every cluster holds about N/K of the sampled documents (c-BTM);
        "bytes": about 1/K of their text, so a domain of many short documents does not take most of
        the clusters on a corpus whose counts are skewed. `sizes`: each text's bytes, when the texts
        are cut short (a sample's documents capped in length) and weigh what they held before."""
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        if len(texts) < k:
            raise UserError(f"cannot fit {k} clusters on {len(texts)} documents")
        if balance not in ("documents", "bytes"):
            raise UserError(f"balance must be documents or bytes, got {balance!r}")
        if sizes is None:
            sizes = [len(t.encode("utf-8")) for t in texts]
        weights = np.maximum(1, np.asarray(sizes, dtype=np.float64))

        def kmeans(z, ok):
            if ok.sum() < k:  # else balanced_kmeans names only the points, not why they are so few
                raise UserError(
                    f"only {int(ok.sum())} of {len(texts)} sampled documents have a word to cluster on "
                    "(the rest are empty, or hold only stop words, numbers or words pruned by --min-df): "
                    f"cannot fit {k} clusters; fit fewer, or on more text"
                )
            w = weights[ok] if balance == "bytes" else None
            return balanced_kmeans(z[ok], k, max_iter=max_iter, seed=seed, weights=w)

        if embedder is not None:
            z, ok = embedder.embed(texts)
            centres, _, info = kmeans(z, ok)
            meta = {
                "fit": {
                    "documents": len(texts),
                    "vectorised": int(ok.sum()),
                    "dims": z.shape[1],
                    "seed": seed,
                    "balance": balance,
                    **info,
                }
            }
            return cls([], np.zeros(0), np.zeros((z.shape[1], 0)), centres, meta, embedder)
        vec = TfidfVectorizer(
            analyzer=analyze,
            sublinear_tf=True,
            min_df=min_df,
            max_df=max_df,
            max_features=max_features,
            dtype=np.float64,
        )
        try:
            x = vec.fit_transform(texts)
        except ValueError as e:  # no term left after min_df / max_df pruning
            raise UserError(
                f"no word is left to cluster on after pruning by --min-df {min_df} / max_df {max_df} in "
                f"{len(texts)} sampled documents ({e}); lower --min-df or sample more documents"
            ) from None
        if x.shape[1] < 2:
            raise UserError("the sample has too few distinct words to cluster")
        # at most one component per word and per sampled document (randomized SVD returns no more)
        dims = max(1, min(dims, x.shape[1] - 1, x.shape[0] - 1))
        svd = TruncatedSVD(n_components=dims, random_state=seed)
        with np.errstate(invalid="ignore", divide="ignore"):  # identical documents: no variance at all
            svd.fit(x)
        dims = svd.components_.shape[0]
        explained = float(svd.explained_variance_ratio_.sum())
        terms = vec.get_feature_names_out().tolist()
        c = cls(terms, vec.idf_.astype(np.float64), svd.components_.astype(np.float64), np.zeros((k, dims)))
        z, ok = c.embed(texts)
        centres, labels, info = kmeans(z, ok)
        c.centres = np.ascontiguousarray(centres)
        c.meta = {
            "fit": {
                "documents": len(texts),
                "vectorised": int(ok.sum()),
                "vocabulary": len(terms),
                "dims": dims,
                "seed": seed,
                "min_df": min_df,
                "max_df": max_df,
                "balance": balance,
                "explained_variance": explained if np.isfinite(explained) else None,
                **info,
            }
        }
        return c

    # -- transform -----------------------------------------------------------------------------
    def counts_vector(self, counts: Counter) -> np.ndarray:
        """Unnormalised projection Σ_w (1 + ln tf_w) · idf_w · C[:, w] of term counts."""
        u = np.zeros(self.dims)
        for term, tf in counts.items():
            i = self.vocab.get(term)
            if i is not None and tf > 0:
                u += (1.0 + np.log(tf)) * self.term_vectors[i]
        return u

    def embed(self, texts: Iterable[str], recent: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(unit vectors [N, d], ok [N]); a text with no known word gets a zero row and ok=False.
        `recent`: a routing context, embedded by its end where a sentence encoder must truncate (tf-idf
        reads all of it either way)."""
        import scipy.sparse as sp

        if self.embedder is not None:
            return self.embedder.embed(texts, recent=recent)

        rows, cols, vals = [], [], []
        n = 0
        for n, text in enumerate(texts, 1):
            counts = Counter(t for t in analyze(text) if t in self.vocab)
            for term, tf in counts.items():
                rows.append(n - 1)
                cols.append(self.vocab[term])
                vals.append(1.0 + np.log(tf))
        x = sp.csr_matrix((vals, (rows, cols)), shape=(n, len(self.terms)))
        z = np.asarray(x @ self.term_vectors)
        norm = np.linalg.norm(z, axis=1)
        ok = norm > 0
        z[ok] /= norm[ok, None]
        return z, ok

    def scores(self, z: np.ndarray) -> np.ndarray:
        """-||h - c_j||² [N, K] (higher is closer)."""
        return neg_sq_dist(z, self.centres)

    def assign(self, texts: list[str], capacity: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centre, or a balanced assignment under per-cluster `capacity`. Returns (labels, ok).

        Texts that cannot be vectorised (no known word) are never dropped: they go to the cluster with
        the most room left (or the smallest), and ok=False marks them (the rule `cluster assign` uses).
        """
        z, ok = self.embed(texts)
        s = np.zeros((len(z), self.k))
        s[ok] = self.scores(z[ok])
        return assign_labels(s, ok, capacity), ok

    def route(
        self, z: np.ndarray, k: int | None = None, temperature: float = 0.1, allowed: np.ndarray | None = None
    ) -> np.ndarray:
        """c-BTM weights [N, K]: top-k of exp(−‖h − c_j‖² / T), renormalised (others exactly 0).

        `allowed` masks out clusters without an expert (opted out), before the top-k.
        """
        if temperature <= 0:
            raise UserError(f"temperature must be positive, got {temperature}")
        if k is not None and k < 1:  # 0 gave NaN weights, -1 sliced off one cluster: top-(K-1)
            raise UserError(f"top-k routing needs k >= 1, got {k}")
        logits = self.scores(z) / temperature
        if allowed is not None:
            logits[:, ~np.asarray(allowed, bool)] = -np.inf
        if k is not None and k < self.k:
            drop = np.argsort(-logits, axis=1, kind="stable")[:, k:]
            np.put_along_axis(logits, drop, -np.inf, axis=1)
        logits -= logits.max(1, keepdims=True)
        w = np.exp(logits)
        return w / w.sum(1, keepdims=True)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, out: str | os.PathLike) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        # a refit writes its arrays beside the ones clusterer.json names and swaps the name with the
        # json: killed between the two files, the old clusterer loads whole (it failed its checksum)
        old = _arrays_named(out)
        name = "arrays.1.safetensors" if old == "arrays.safetensors" else "arrays.safetensors"
        with atomic_path(out / name) as tmp:
            arrays = {"idf": self.idf, "components": self.components, "centres": self.centres}
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        digest = _digest((out / name).read_bytes(), self.terms)
        write_json_atomic(
            out / "clusterer.json",
            {
                "format": FORMAT,
                "version": VERSION,
                "k": self.k,
                "dims": self.dims,
                "analyzer": {
                    "words": WORD.pattern,
                    "lowercase": True,
                    "min_length": 2,
                    "stop_words": "english",
                    "numbers": NUMBER,
                    "tf": "1 + ln(tf)",
                },
                "arrays": {"file": name, "sha256": digest},
                "embedder": None
                if self.embedder is None
                else {
                    "model": str(self.embedder.model_dir),
                    "fingerprint": self.embedder.fingerprint(),
                    "pooling": "mean",
                    "max_length": self.embedder.max_length,
                },
                "meta": self.meta,
                "vocabulary": self.terms,
            },
        )
        if old is not None and old != name:
            (out / old).unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Clusterer:
        path = Path(path)
        meta_path = path / "clusterer.json"
        if not meta_path.is_file():
            raise ClustererError(f"{path}: not a clusterer (no clusterer.json)")
        try:
            info = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ClustererError(f"{meta_path}: corrupted ({e})") from e
        if info.get("format") != FORMAT or info.get("version") not in READABLE:
            raise ClustererError(
                f"{meta_path}: unsupported clusterer format {info.get('format')} "
                f"v{info.get('version')} (this elmforest reads {FORMAT} v{', v'.join(map(str, READABLE))})"
            )
        missing = {"arrays", "vocabulary", "k", "dims"} - set(info)
        if missing:
            raise ClustererError(f"{meta_path}: corrupted (missing {sorted(missing)})")
        name = info["arrays"].get("file") if isinstance(info["arrays"], dict) else None
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ClustererError(f"{meta_path}: arrays file {name!r} must be a file name inside {path}")
        arrays = path / name
        if arrays.is_symlink() or not arrays.is_file():
            raise ClustererError(f"{arrays}: missing (or a symbolic link, which is not taken in)")
        raw = arrays.read_bytes()
        digest = hashlib.sha256(raw).hexdigest() if info["version"] == 1 else _digest(raw, info["vocabulary"])
        if digest != info["arrays"]["sha256"]:
            raise ClustererError(
                f"{arrays}: checksum mismatch (corrupted arrays or vocabulary, or not this clusterer's)"
            )
        a = load_file(str(arrays))
        embedder = None
        if info.get("embedder"):
            e = info["embedder"]
            embedder = SentenceEmbedder(e["model"], max_length=e.get("max_length", 256))
            recorded = str(e["fingerprint"])  # 16 digits: fitted before the weights were in it
            if embedder.fingerprint(weights=len(recorded) != 16) != recorded:
                raise ClustererError(f"{e['model']}: not the embedding model this clusterer was fitted with")
        c = cls(
            list(info["vocabulary"]), a["idf"], a["components"], a["centres"], info.get("meta", {}), embedder
        )
        if c.k != info["k"] or c.dims != info["dims"]:
            raise ClustererError(f"{meta_path}: k/dims do not match the arrays")
        return c
