"""Drafts from what the model wrote before: an n-gram index of its own earlier answers.

Verified decoding accepts a draft when it is the model's next token, and a model's answers repeat its own habits:
the same openings ("Here are three practical use cases for Python's `"), the same list and docstring scaffolding,
the same phrases. A corpus of the model's own greedy answers to many prompts (the self-distillation answers an
adapter is trained on) predicts them: for the conversation's last n tokens (n = max_ngram down to 1), the token that
most often followed them in the corpus is the draft, and the path goes on from there (SuffixDecoding, Oliaro et
al. 2024, and REST, He et al. 2023, draft from such a datastore; this one is an exact n-gram count table, not a
suffix tree). The drafts are only guesses: the causal rows check them, so the output stays the model's whatever the
corpus holds.

The index is built in memory from the corpus's tokens at the first lookup (about half a second per 700k tokens on these
CPUs, so loading an adapter, or writing a corpus, does not pay it); an adapter folder stores the tokens alone
(CORPUS_FILE, int32 with separators, under a byte per token compressed). For each n it keeps the n-grams' hashes
sorted, each with one following token and its count, so a lookup is a binary search.
"""

from functools import cached_property
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import SBDError

CORPUS_FILE = "corpus.npz"  # in an adapter folder: the tokens of the answers its drafts come from
MAX_NGRAM = 6  # longest context matched (4 and 10 drafted within 1% of 6 in an offline simulation, BENCHMARKS.md 13)
SHARES = (0.4, 0.7)  # bounds of the first draft's share of its context's continuations: its strength bucket
MAX_TOKENS = 12  # most drafts per proposal (as prompt lookup's)
SEPARATOR = -1  # between documents: no n-gram spans two
_MASK = (1 << 64) - 1
_P = 0x9E3779B97F4A7C15  # odd multiplier of the n-gram hash (64 bits: collisions among ~10^7 n-grams are ~10^-5)


class Corpus:
    """The n-gram counts of a list of token sequences (documents). `propose(context, limit)` drafts the likeliest
    continuation of `context`; `matched` is the n of the first draft's match and `strength` the bucket (0-2, SHARES)
    of its share of that context's continuations in the corpus: together the proposal's acceptance key (on the
    validation answers a 6-gram match whose draft follows it in over 70% of its occurrences passed 75% of the time,
    one under 40% 17%)."""

    def __init__(self, tokens: np.ndarray, max_ngram: int = MAX_NGRAM, max_tokens: int = MAX_TOKENS):
        """`tokens`: documents joined by SEPARATOR, each followed by one (from_docs makes it)."""
        if max_ngram < 1:
            raise SBDError(f"corpus max_ngram must be >= 1 (got {max_ngram})")
        self.max_ngram, self.max_tokens = max_ngram, max_tokens
        self.tokens = np.asarray(tokens, dtype=np.int64)
        if len(self.tokens) and self.tokens[-1] != SEPARATOR:
            self.tokens = np.append(self.tokens, SEPARATOR)
        self.docs = int((self.tokens == SEPARATOR).sum())
        self.matched = self.strength = 0

    @classmethod
    def from_docs(cls, docs: Iterable[Sequence[int]], **kwargs) -> "Corpus":
        parts: List[int] = []
        for doc in docs:
            parts.extend(int(t) for t in doc)
            parts.append(SEPARATOR)
        return cls(np.asarray(parts, dtype=np.int64), **kwargs)

    @classmethod
    def from_jsonl(cls, path: Union[str, Path], tokenizer, **kwargs) -> "Corpus":
        """The corpus of a training data file (data_docs)."""
        return cls.from_docs(data_docs(path, tokenizer), **kwargs)

    def __len__(self) -> int:
        """Tokens in the corpus (separators not counted)."""
        return len(self.tokens) - self.docs

    @cached_property
    def tables(self) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """tables[n - 1] = (hashes, next tokens, counts) of every distinct (n-gram, next token) pair, sorted by hash
        then token. The hash of t[i-n+1..i] is sum_j (t[i-j] + 1) * P^j mod 2^64, the sum _hashes computes."""
        t = self.tokens
        nxt = np.append(t[1:], SEPARATOR)
        key = np.zeros(len(t), dtype=np.uint64)
        whole = np.ones(len(t), dtype=bool)  # the n-gram ending at i has no separator (one that has could never
        # match a context, whose tokens are >= 0: kept out to save memory)
        power = np.uint64(1)
        tables = []
        for n in range(1, self.max_ngram + 1):
            back = np.full(len(t), SEPARATOR, dtype=np.int64)  # t[i - n + 1]
            back[n - 1:] = t[: len(t) - n + 1]
            whole &= back != SEPARATOR
            key += (back + 1).astype(np.uint64) * power  # uint64 arithmetic wraps: the hash is mod 2^64
            power = np.uint64((int(power) * _P) & _MASK)
            ok = whole & (nxt != SEPARATOR)
            k, x = key[ok], nxt[ok]
            order = np.lexsort((x, k))
            k, x = k[order], x[order]
            first = np.ones(len(k), dtype=bool)
            first[1:] = (k[1:] != k[:-1]) | (x[1:] != x[:-1])
            starts = np.flatnonzero(first)
            tables.append((k[starts], x[starts].astype(np.int32), np.diff(np.append(starts, len(k))).astype(np.int32)))
        return tables

    def _hashes(self, context: Sequence[int]) -> List[int]:
        """The hashes of the context's last 1..max_ngram tokens (fewer for a shorter context)."""
        out, h, power = [], 0, 1
        for tok in reversed(context[-self.max_ngram:]):
            h = (h + (int(tok) + 1) * power) & _MASK
            power = (power * _P) & _MASK
            out.append(h)
        return out

    def next_token(self, context: Sequence[int]) -> Optional[Tuple[int, int, int, int]]:
        """(token, its count, all continuations' count, n) for the longest suffix of `context` seen in the corpus
        with a continuation, its most frequent follower (the smallest token id on a tie); None when no token of the
        context occurs."""
        for n, h in reversed(list(enumerate(self._hashes(context), start=1))):
            keys, nexts, counts = self.tables[n - 1]
            h = np.uint64(h)
            lo, hi = np.searchsorted(keys, h, "left"), np.searchsorted(keys, h, "right")
            if hi > lo:
                c = counts[lo:hi]
                j = int(np.argmax(c))
                return int(nexts[lo + j]), int(c[j]), int(c.sum()), n
        return None

    def propose(self, context: Sequence[int], limit: Optional[int] = None) -> List[int]:
        """Up to `limit` (default max_tokens) drafts to follow `context`: the most frequent next token of its longest
        matched suffix, then of that path's, and so on; [] when nothing matches."""
        limit = self.max_tokens if limit is None else min(limit, self.max_tokens)
        path = list(context[-self.max_ngram:])
        drafts: List[int] = []
        self.matched = self.strength = 0
        while len(drafts) < limit:
            found = self.next_token(path)
            if found is None:
                break
            if not drafts:
                self.matched = found[3]
                self.strength = sum(found[1] >= bound * found[2] for bound in SHARES)
            drafts.append(found[0])
            path = (path + [found[0]])[-self.max_ngram:]
        return drafts

    def save(self, path: Union[str, Path]) -> None:
        """Write the tokens (compressed; the index is rebuilt on load)."""
        np.savez_compressed(path, tokens=self.tokens.astype(np.int32), max_ngram=np.int32(self.max_ngram))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Corpus":
        try:
            with np.load(path) as f:
                tokens, max_ngram = f["tokens"], int(f["max_ngram"])
        except (OSError, KeyError, ValueError) as e:
            raise SBDError(f"{path} is not an mlx-sbd draft corpus: {e}") from None
        return cls(tokens, max_ngram)


def data_docs(path: Union[str, Path], tokenizer) -> List[List[int]]:
    """The rows of a training data file (data.py's formats, .jsonl or .jsonl.gz), tokenized as training tokenizes
    them: with the chat template, so the template's tokens before an answer are matched too."""
    from .data import load_split

    return [ids for ids, _ in load_split(Path(path), tokenizer, 1 << 30)]
