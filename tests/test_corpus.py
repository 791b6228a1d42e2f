"""Corpus drafts (corpus.py, drafting.py's `corpus` source): the n-gram counts against a plain scan of the
documents, the file in an adapter folder, greedy identity with mlx_lm on the base weights when the drafts come from
the corpus, and the sampling distribution with its one-hot drafts.
"""

import random
from collections import Counter

import numpy as np
import pytest

import mlx_sbd
from mlx_sbd.adapter import copy_adapter, save_corpus
from mlx_sbd.corpus import CORPUS_FILE, SHARES, Corpus
from mlx_sbd.data import load_split
from mlx_sbd.drafting import CORPUS_PRIOR, Drafter, PromptLookup
from mlx_sbd.errors import SBDError
from test_verified import (PROMPTS, gated, mlx_lm_greedy, ours, run_sampling_test, small_vocab)  # noqa: F401


def scanned_next(docs, context, max_ngram):
    """The definition, by scanning every document: for the longest suffix of `context` (n <= max_ngram) that occurs
    in a document followed by a token of that document, the most frequent such token (the smallest on a tie), its
    count, the count of all, and n."""
    for n in range(min(max_ngram, len(context)), 0, -1):
        suffix = list(context[len(context) - n:])
        followers = Counter(doc[i + n] for doc in docs for i in range(len(doc) - n) if list(doc[i:i + n]) == suffix)
        if followers:
            best = max(followers.values())
            token = min(t for t, c in followers.items() if c == best)
            return token, best, sum(followers.values()), n
    return None


def random_docs(rng, alphabet, count):
    return [[rng.randrange(alphabet) for _ in range(rng.randrange(1, 30))] for _ in range(count)]


@pytest.mark.parametrize("alphabet,max_ngram", [(3, 1), (3, 4), (6, 3), (40, 6)])
def test_next_token_matches_a_scan_of_the_documents(alphabet, max_ngram):
    rng = random.Random(alphabet * 10 + max_ngram)
    docs = random_docs(rng, alphabet, 40)
    corpus = Corpus.from_docs(docs, max_ngram=max_ngram)
    assert len(corpus) == sum(map(len, docs)) and corpus.docs == len(docs)
    for _ in range(200):
        context = [rng.randrange(alphabet + 2) for _ in range(rng.randrange(1, 9))]  # some tokens never occur
        if rng.random() < 0.5:  # half the time a real stretch of a document: long matches
            doc = rng.choice(docs)
            i = rng.randrange(len(doc))
            context = doc[max(0, i - rng.randrange(1, 9)): i + 1]
        assert corpus.next_token(context) == scanned_next(docs, context, max_ngram)


def test_propose_follows_its_own_path():
    rng = random.Random(7)
    docs = random_docs(rng, 5, 30)
    corpus = Corpus.from_docs(docs, max_ngram=3, max_tokens=6)
    for _ in range(100):
        context = [rng.randrange(5) for _ in range(rng.randrange(1, 6))]
        limit = rng.randrange(0, 9)
        path, want = list(context), []
        while len(want) < min(limit, 6):
            found = scanned_next(docs, path, 3)
            if found is None:
                break
            want.append(found[0])
            path.append(found[0])
        assert corpus.propose(context, limit) == want
        if want:  # the first draft's match: its n, and its share of the continuations there in buckets
            _, count, total, n = scanned_next(docs, context, 3)
            share = count / total
            assert (corpus.matched, corpus.strength) == (n, (share >= SHARES[0]) + (share >= SHARES[1]))


def test_no_ngram_spans_two_documents():
    corpus = Corpus.from_docs([[1, 2], [3, 4]])
    assert corpus.next_token([2]) is None  # 2 ends its document: nothing follows it
    assert corpus.next_token([1, 2, 3]) == (4, 1, 1, 1)  # "2 3" never occurred: back off to "3"
    assert corpus.propose([7, 8]) == [] and corpus.matched == 0  # tokens the corpus never saw


def test_corpus_file_round_trip_and_adapter_folder(gated, tmp_path):
    base, adapter, _, tokenizer = gated
    rng = random.Random(3)
    docs = random_docs(rng, 60, 50)
    corpus = Corpus.from_docs(docs, max_ngram=4)
    folder = tmp_path / "adapter"
    copy_adapter(adapter, folder)
    assert not (folder / CORPUS_FILE).exists()
    assert mlx_sbd.load(base, adapter_path=folder)[0].corpus is None
    save_corpus(folder, corpus)
    copy = tmp_path / "copy"
    copy_adapter(folder, copy)  # the corpus travels with its adapter (ship_adapter.py copies this way)
    for path in (folder, copy):
        loaded = mlx_sbd.load(base, adapter_path=path)[0].corpus
        assert loaded.max_ngram == 4 and np.array_equal(loaded.tokens, corpus.tokens)
        for doc in docs[:10]:
            assert loaded.propose(doc[:3]) == corpus.propose(doc[:3])
    (folder / CORPUS_FILE).write_bytes(b"not a corpus")
    with pytest.raises(SBDError, match="not an mlx-sbd draft corpus"):
        mlx_sbd.load(base, adapter_path=folder)


def test_corpus_of_a_data_file_is_its_training_sequences(gated, tmp_path):
    """from_jsonl tokenizes rows as training does (data.load_split), a gzipped file too."""
    import gzip

    _, _, _, tokenizer = gated
    rows = ['{"text": "abcabd"}', '{"prompt": "ab", "completion": "cab"}', '{"text": "dcba"}']
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write("\n".join(rows) + "\n")
    want = Corpus.from_docs(ids for ids, _ in load_split(tmp_path / "train.jsonl", tokenizer, 1000))
    for name in ("train.jsonl", "train.jsonl.gz"):
        assert np.array_equal(Corpus.from_jsonl(tmp_path / name, tokenizer).tokens, want.tokens)


def own_answers(base, n=40):
    """The base model's greedy continuations of PROMPTS (prompt + answer): a corpus that drafts its answers."""
    return [ids + mlx_lm_greedy(base, ids, n) for ids in PROMPTS]


@pytest.mark.parametrize("draft,layout", [("lookup", "linear"), ("both", "linear"), ("auto", "auto")])
def test_greedy_equals_mlx_lm_with_corpus_drafts(gated, draft, layout, monkeypatch):
    """Drafts from a corpus of the base's own answers (and, to make rejections, of answers to other prompts): the
    output is mlx_lm's on the base, and the corpus's drafts pass (more drafts accepted than without it). Rows are
    priced cheap, so auto sends drafts on this CPU whatever its noise."""
    from mlx_sbd import costs, decode

    monkeypatch.setattr(decode, "cached_row_cost", lambda m: costs.ContextCost({256: {1: 1.0, 32: 1.2}}))
    base, _, model, tokenizer = gated
    rng = random.Random(5)
    noise = [[rng.randrange(3, 60) for _ in range(8)] for _ in range(20)]
    corpus = Corpus.from_docs(own_answers(base) + [n + mlx_lm_greedy(base, n, 20) for n in noise])
    prompts = [[rng.randrange(3, 60)] + ids for ids in PROMPTS]  # the corpus's match begins inside the prompt
    accepted = {}
    for use in (corpus, False):
        accepted[use is False] = 0
        for ids in prompts:
            # prompt lookup of 8-grams only: it rarely matches, so the drafts are the corpus's (or none)
            got, last = ours(model, tokenizer, ids, max_tokens=40, block_size=8, gamma=float("inf"), draft=draft,
                             layout=layout, corpus=use, lookup=PromptLookup(8, 8))
            assert got == mlx_lm_greedy(base, ids, 40, tokenizer.eos_token_ids)
            accepted[use is False] += last.accepted
    assert accepted[False] > accepted[True] + 20, accepted  # with vs without the corpus


def test_auto_drafts_from_the_corpus_where_the_conversation_has_no_match():
    corpus = Corpus.from_docs([[1, 2, 3, 4, 5, 6, 7, 8]] * 3)
    auto = Drafter("auto", has_adapter=False, cost=lambda rows, context=0: 1.0, corpus=corpus)  # rows free
    drafts, source, _, _ = auto.plan([9, 1, 2, 3], None, 5, 1, 100)
    assert (drafts, source) == ([4, 5, 6, 7, 8], "corpus") and auto.last_key == ("corpus", 3, 2)  # 4 always follows
    assert auto._rate(auto.last_key).expected(1)[1] == pytest.approx(CORPUS_PRIOR[3, 2][0])
    # a prompt-lookup match with a better record wins
    auto = Drafter("auto", has_adapter=False, cost=lambda rows, context=0: 1.0, corpus=corpus)
    for _ in range(20):
        auto._rate(("lookup", 3)).record(5, 5)
    drafts, source, _, _ = auto.plan([1, 2, 3, 9, 9, 1, 2, 3], None, 5, 1, 100)
    assert source == "lookup" and drafts == [9, 9, 1, 2, 3]
    fixed = Drafter("lookup", corpus=corpus)
    assert fixed.propose([9, 1, 2, 3], None, 3) == ([4, 5, 6], "corpus")  # prompt lookup has none: the corpus's
    assert fixed.propose([4, 9, 4], None, 3) == ([9, 4], "lookup")  # prompt lookup first
    assert Drafter("sbd", corpus=corpus).corpus is None


@pytest.mark.parametrize("draft", ["lookup", "auto"])
def test_corpus_sampling_keeps_the_distribution(small_vocab, draft):
    """One-hot corpus drafts (q = 1 at the draft): 3000 draws of the first 3 tokens against the exact distribution.
    The corpus continues the prompt with the model's likely and unlikely tokens."""
    corpus = Corpus.from_docs([[4, 5, 6, 6, 3, 6], [4, 5, 6, 6, 0, 2], [5, 6, 3]])
    p, chi2 = run_sampling_test(small_vocab, 3000, draft=draft, corpus=corpus)
    assert p > 1e-3, f"chi2 {chi2:.1f}, p {p:.2g}"


def test_make_corpus_script_writes_the_adapters_corpus(gated, tmp_path):
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from make_corpus import main

    base, adapter, _, tokenizer = gated
    folder = tmp_path / "adapter"
    copy_adapter(adapter, folder)
    files = []
    for i, rows in enumerate((['{"text": "abcabd"}'], ['{"prompt": "ab", "completion": "cab"}', '{"text": "dc"}'])):
        files.append(tmp_path / f"part{i}.jsonl")
        files[-1].write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(main, ["--model", str(base), "--adapter", str(folder), "--max-ngram", "3"]
                                + [a for f in files for a in ("--data", str(f))])
    assert result.exit_code == 0, result.output
    want = Corpus.from_docs([ids for f in files for ids, _ in load_split(f, tokenizer, 1000)], max_ngram=3)
    got = mlx_sbd.load(base, adapter_path=folder)[0].corpus
    assert np.array_equal(got.tokens, want.tokens) and got.max_ngram == 3 and got.docs == 3


def test_cli_generate_drafts_from_the_adapters_corpus_unless_told(gated, tmp_path):
    from click.testing import CliRunner

    from mlx_sbd.cli import cli

    base, adapter, _, _ = gated
    folder = tmp_path / "adapter"
    copy_adapter(adapter, folder)
    save_corpus(folder, Corpus.from_docs(own_answers(base)))
    args = ["generate", "--model", str(base), "--adapter-path", str(folder), "-p", "abc", "-m", "12",
            "--ignore-chat-template"]
    results = [CliRunner().invoke(cli, args + extra) for extra in ([], ["--no-corpus"])]
    for r in results:
        assert r.exit_code == 0, r.output
    assert "drafts: auto (prompt lookup, the corpus and the mask block)" in results[0].output
    assert "drafts: auto (prompt lookup and the mask block)" in results[1].output
    assert results[0].output.splitlines()[0] == results[1].output.splitlines()[0]  # the same text
