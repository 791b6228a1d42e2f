"""The evidence scripts: data hygiene (nothing the adapter trains on comes from the held-out modules),
repro_table1's split of training and evaluation, bench_distributed on a training config, and learning_curve's
teacher-forced decoding, entropy_ceiling's EB count."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_sbd
from mlx_sbd.generate import encode_prompt
from mlx_sbd.loading import UNGATED_ADAPTER
from mlx_sbd.samplers import budget_reveal, make_selector
from mlx_sbd.tasks import alphabet, write_dataset
from mlx_sbd.tiny import make_tiny_model

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import entropy_ceiling  # noqa: E402
import eval_adapter  # noqa: E402
import learning_curve  # noqa: E402
import make_distill_data  # noqa: E402
import repro_table1  # noqa: E402

from mlx_sbd import stdlib_text  # noqa: E402


def test_text_rows_never_come_from_held_out_modules():
    modules = stdlib_text.split_modules(0)
    train = stdlib_text.doc_texts(modules["train"], 10_000, 0) + stdlib_text.code_texts(modules["train"], 10_000, 0)
    valid = stdlib_text.doc_texts(modules["valid"], 10_000, 0)
    assert len(train) > 100 and valid
    held_out = eval_adapter.raw_doc_texts(0, 10_000)  # what eval_adapter scores as unseen documentation
    held_out += [p[:200] for p in stdlib_text.code_prompts(modules["test"], 10_000, 0)]  # heldout's code prompts
    assert held_out
    seen = set(train + valid)
    # A training row is a docstring cut at a paragraph break; none may start like a held-out module's docstring.
    assert not any(doc[:200] == text[:200] for doc in held_out for text in seen)
    assert set(modules["train"]).isdisjoint(modules["test"]) and set(modules["valid"]).isdisjoint(modules["test"])


def test_distill_prompts_stay_in_their_split_and_are_read_back(tmp_path):
    path = tmp_path / "prompts.jsonl"
    made = make_distill_data.split_prompts(path, {"test": 0, "valid": 5, "train": 40}, 30, 0)
    modules = stdlib_text.split_modules(0)
    held_out = set(stdlib_text.chat_prompts(modules["test"], 0) + stdlib_text.code_prompts(modules["test"], 10_000, 0))
    assert made["test"] == []
    assert [sum(r["kind"] == kind for r in made["train"]) for kind in ("chat", "code")] == [40, 30]
    assert [sum(r["kind"] == kind for r in made["valid"]) for kind in ("chat", "code")] == [5, 3]
    assert not held_out & {r["prompt"] for rows in made.values() for r in rows}
    # A rerun (say on another machine, whose standard library splits differently) answers the written prompts.
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    first_train = next(r for r in rows if r["split"] == "train")
    first_train["prompt"] = "written before"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = make_distill_data.split_prompts(path, {"test": 9, "valid": 9, "train": 9}, 0, 1)
    assert again["train"][0]["prompt"] == "written before" and len(again["train"]) == 70


def test_general_prompts_keep_their_topics_in_one_split_and_leave_bench_decode_held_out(tmp_path, monkeypatch):
    """Each general topic's questions sit in one split (the held-out kind "general" is the test split), the seeded
    split is the same every call, split_prompts adds n_general of them (a tenth outside train), and no topic is
    one of bench_decode's four general prompts."""
    from mlx_sbd import general_prompts as g

    topics = g.split_topics(0)
    every = g.TOPICS + g.MORE_TOPICS
    assert sorted(sum(topics.values(), [])) == sorted(every) and len(set(every)) == len(every) and all(topics.values())
    assert topics == g.split_topics(0) and topics != g.split_topics(1)
    owner = {t: s for s, ts in topics.items() for t in ts}
    for split in topics:
        questions = g.general_prompts(split, 0)
        assert len(questions) == len(topics[split]) * len(g.FORMS)
        assert {owner[t] for q in questions for t in every if t in q} == {split}
    # the topics added later join train only: valid and test are the split of TOPICS alone, as before them
    monkeypatch.setattr(g, "MORE_TOPICS", [])
    assert {s: topics[s] for s in ("valid", "test")} == {s: g.split_topics(0)[s] for s in ("valid", "test")}
    monkeypatch.undo()
    made = make_distill_data.split_prompts(tmp_path / "p.jsonl", {"test": 2, "valid": 5, "train": 40}, 30, 0, 50)
    general = {split: [r["prompt"] for r in rows if r["prompt"] in set(g.general_prompts(split, 0))]
               for split, rows in made.items()}
    assert [len(general[s]) for s in ("train", "valid", "test")] == [50, 5, 2]
    assert [sum(r["kind"] == "chat" for r in made[s]) for s in ("train", "valid")] == [90, 10]
    # --prompts-only writes the prompts of a stage answered elsewhere (device_stage.sh) without loading the model
    from click.testing import CliRunner

    result = CliRunner().invoke(make_distill_data.main, ["--out", str(tmp_path / "d"), "--n-train", "3", "--n-valid",
                                                         "1", "--n-test", "0", "--n-general", "20", "--prompts-only"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "d" / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 3 + 20 + 1 + 1 and not (tmp_path / "d" / "train.jsonl").exists()
    bench = " ".join(t.lower() for t in g.TOPICS + g.MORE_TOPICS)
    for word in ("robot", "paint", "hash table", "from home", "productiv", "france", "paris"):  # bench_decode's
        assert word not in bench, word


def test_held_out_prompts_are_the_same_in_every_process():
    """Prompts quote signatures; a default like <object object at 0x7f...> would make them differ between runs."""
    code = ("import hashlib; from mlx_sbd import stdlib_text as s; m = s.split_modules(0)['test']; "
            "print(hashlib.sha256(repr((s.chat_prompts(m), s.code_prompts(m, 50))).encode()).hexdigest())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(runs) == 1


@pytest.mark.slow
def test_repro_table1_trains_one_model_per_process_then_evaluates(tmp_path):
    """`--train-only sbd` trains the pretrained base and the SBD model and nothing else; the plain command then
    trains the NTP model, reuses the finished ones untouched and writes the table."""
    work, out = tmp_path / "work", tmp_path / "out"
    script = Path(__file__).parents[1] / "scripts" / "repro_table1.py"
    args = [sys.executable, str(script), "--work", str(work), "--out", str(out), "--n-train", "48", "--n-test", "2",
            "--iters", "3", "--batch-size", "4", "--hidden-size", "32", "--layers", "1", "--pretrain-iters", "2",
            "--ks", "8", "--gammas", "0,1"]
    subprocess.run(args + ["--train-only", "sbd"], check=True, capture_output=True)
    assert (work / "sbd" / "adapters.safetensors").is_file() and (work / "pretrained" / "adapters.safetensors").is_file()
    assert not (work / "ntp").exists() and not (work / "rows.json").exists() and not out.exists()

    second = subprocess.run(args, check=True, capture_output=True, text=True)
    log = second.stdout + second.stderr
    # The finished runs resume at their last step (nothing retrained); only the NTP fine-tune starts from 0.
    assert f"{Path('pretrained', 'checkpoints', 'step_0000002')} (step 2)" in log, log
    assert f"{Path('sbd', 'checkpoints', 'step_0000003')} (step 3)" in log, log
    assert f"no checkpoint in {work / 'ntp' / 'checkpoints'}, starting from step 0" in log, log
    rows = json.loads((out / "table1.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["NTP model, NTP decoding", "SBD model, NTP decoding",
                                         "SBD model, k=8, gamma=0", "SBD model, k=8, gamma=1"]
    # The plot needs the optional matplotlib (the `bench` extra); without it the table is still written.
    assert (out / "table1.png").is_file() == repro_table1.have_matplotlib()


@pytest.mark.slow
def test_bench_distributed_trains_a_config_on_one_and_two_processes_alike(tmp_path):
    """--config trains the YAML's model and data (not the built-in tiny model) with its settings, and the two
    runs, one process and two data-parallel ranks over the same global batches, end at the same loss."""
    base = make_tiny_model(tmp_path / "base", alphabet=alphabet("arithmetic"), hidden_size=48, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=96)
    data = write_dataset(tmp_path / "data", "arithmetic", 32, 4, 1, seed=0)
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {base}\ndata: {data}\nbatch_size: 4\nblock_size_max: 4\n"
                      "learning_rate: 3.0e-3\nlora_parameters: {rank: 4, scale: 10.0, dropout: 0.0}\n")
    out = tmp_path / "bench.json"
    script = Path(__file__).parents[1] / "scripts" / "bench_distributed.py"
    subprocess.run([sys.executable, str(script), "--config", str(config), "--processes", "1,2", "--iters", "3",
                    "--out", str(out)], check=True, capture_output=True)
    runs = json.loads(out.read_text())["runs"]
    assert [r["processes"] for r in runs] == [1, 2]
    assert all(len(r["reports"]) == 3 for r in runs)
    assert [max(r["lr"] for r in run["reports"]) for run in runs] == pytest.approx([3e-3, 3e-3])  # the config's lr
    assert [r["ntp"] for r in runs[0]["reports"]] == pytest.approx([r["ntp"] for r in runs[1]["reports"]], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("k, gamma", [(4, 0.1), (8, 0.35)])
def test_teacher_forcing_a_models_own_sbd_output_replays_its_decode(k, gamma):
    """learning_curve scores checkpoints by teacher-forced block decoding in one batched layout. Fed the text the
    real SBD decode loop (KV cache, aligned blocks, EB rule) produced, it must spend the same forwards on it and
    never reveal a token other than the one written, or its numbers are not what decoding would do. (The lossy
    loop's tool, so the paper's ungated adapter: a gated one's mask rows are only ever the trailing rows.)"""
    model, tokenizer = mlx_sbd.load(adapter_path=UNGATED_ADAPTER)
    messages = [{"role": "user", "content": "What is the Python standard library module `sched` used for?"}]
    ids = encode_prompt(tokenizer, messages)
    out, last = [], None
    for last in mlx_sbd.stream_generate(model, tokenizer, messages, max_tokens=40, block_size=k, gamma=gamma,
                                        verify=False):  # the lossy loop, which teacher forcing replays
        out += last.tokens
    assert last.finish_reason == "length" and last.nfe < len(out)  # blocks of several tokens, no EOS block
    replay = learning_curve.teacher_forced(model, ids + out, len(ids), k, make_selector("entropy", gamma))
    assert replay == {"forwards": last.nfe, "tokens": len(out), "wrong": 0}


@pytest.mark.slow
def test_bench_decode_interleaves_rounds_and_takes_each_rounds_ratio(tmp_path):
    """Shared machines drift, so bench_decode runs every setting once per prompt within a round before the next
    round starts, and a setting's ratio is the median of its per-round tokens/s over mlx_lm's in that round; the
    prediction is the tokens over the sum of time(rows, context) of the forwards it ran. Both re-derived from the raw
    runs."""
    from mlx_sbd.costs import ContextCost

    out = tmp_path / "bench.json"
    script = Path(__file__).parents[1] / "scripts" / "bench_decode.py"
    subprocess.run([sys.executable, str(script), "--linear", "4", "--predraft", "2", "--max-tokens", "12",
                    "--prompts", "2", "--rounds", "3", "--cold", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    rows = result["rows"]
    # the default adapter has a draft corpus, so auto also runs without it; --cold: it records its drafts'
    # acceptance, so auto also runs without that prior
    assert [r["setting"] for r in rows] == ["mlx_lm", "ntp", "lossy k=8", "linear k=4", "predraft k=2",
                                            "auto (default)", "auto, no corpus", "auto, no prior"]
    runs = result["runs"]
    starts = [[run["start"] for name in runs for run in runs[name][rnd]] for rnd in range(3)]
    assert all(max(starts[rnd]) < min(starts[rnd + 1]) for rnd in range(2))  # round by round, not setting by setting

    def tps(rr):
        return sum(run["tokens"] for run in rr) / sum(run["seconds"] for run in rr)

    cost = ContextCost({int(c): {int(r): t for r, t in ts.items()} for c, ts in result["time_rows"].items()})
    for r in rows:
        ratios = sorted(tps(runs[r["setting"]][rnd]) / tps(runs["mlx_lm"][rnd]) for rnd in range(3))
        assert r["ratio"] == pytest.approx(ratios[1])
        first = runs[r["setting"]][0]
        assert r["tokens"] == sum(run["tokens"] for run in first) and r["nfe"] <= r["tokens"] + 2
        if r["predicted_tps"]:
            forwards = [n for run in first for n in run["rows"]]
            contexts = [c for run in first for c in run["contexts"]]
            assert len(forwards) == len(contexts) == r["nfe"]
            assert r["predicted_tps"] == pytest.approx(r["tokens"] / sum(map(cost, forwards, contexts)))
    assert rows[0]["ratio_lo"] == rows[0]["ratio_hi"] == pytest.approx(1.0)


@pytest.mark.parametrize("errors, gamma, forwards", [
    ([0.01, 0.02, 0.5], 0.1, 1),  # SBD_METHOD.md §4: reveal all three at once
    ([0.3, 0.5, 0.01], 0.1, 2),  # reveal the .01 and the .3, then the .5
    ([0.2, 0.3, 0.4], 0.0, 3),  # gamma 0: one per forward
    ([0.0, 0.0, 0.7, 0.9], 0.0, 2),  # zero-entropy ties cost nothing: both go with the .7, then the .9
])
def test_entropy_ceiling_counts_the_eb_rules_forwards(errors, gamma, forwards):
    assert entropy_ceiling.eb_forwards(np.array(errors), gamma) == forwards


def test_entropy_ceiling_agrees_with_the_decoders_selector_and_aligns_blocks():
    rng = np.random.default_rng(0)
    for _ in range(50):  # the same count as running mlx_sbd's EB selector with fixed errors until no mask is left
        errors, gamma = rng.exponential(0.1, size=int(rng.integers(1, 9))), float(rng.choice([0.0, 0.1, 0.35]))
        masked, forwards = mx.ones(len(errors), dtype=mx.bool_), 0
        while masked.any().item():
            masked, forwards = masked & ~budget_reveal(mx.array(errors, dtype=mx.float32), masked, gamma), forwards + 1
        assert entropy_ceiling.eb_forwards(errors, gamma) == forwards
    # An answer at positions 6..11 with k=4: block 1 holds 6-7 (4-5 are prompt), block 2 holds 8-11.
    assert entropy_ceiling.ceiling_forwards(np.zeros(6), 6, 4, 0.1) == 2
    assert entropy_ceiling.ceiling_forwards(np.full(6, 1.0), 6, 4, 0.1) == 6
    assert entropy_ceiling.ceiling_forwards(np.array([0, 0, 1, 1, 1, 1.0]), 6, 4, 1.0) == 1 + 2


def test_capitals_accuracy_counts_any_accepted_name_in_order():
    n = len(eval_adapter.CAPITALS)
    ukraine = [c for c, _ in eval_adapter.CAPITALS].index("Ukraine")
    texts = ["no idea"] * n
    texts[0] = "The capital of France is PARIS."  # case-insensitive
    texts[ukraine] = "It is Kiev."  # either accepted spelling
    texts[1] = "The capital of Germany is Paris."  # another country's capital does not count
    assert eval_adapter.capitals_accuracy(texts) == 2 / n
