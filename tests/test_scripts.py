"""The evidence scripts' data hygiene: nothing the adapter trains on comes from the held-out modules."""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import eval_adapter  # noqa: E402
import make_distill_data  # noqa: E402


def test_text_rows_never_come_from_held_out_modules():
    modules = make_distill_data.split_modules(random.Random(0))
    train = make_distill_data.doc_texts(modules["train"], 10_000, random.Random(0))
    valid = make_distill_data.doc_texts(modules["valid"], 10_000, random.Random(0))
    assert len(train) > 100 and valid
    held_out = eval_adapter.raw_doc_texts(0, 10_000)  # what eval_adapter scores as unseen documentation
    assert held_out
    seen = {row["text"] for row in train + valid}
    # A training row is a docstring cut at a paragraph break; none may start like a held-out module's docstring.
    assert not any(doc[:200] == text[:200] for doc in held_out for text in seen)
    assert set(modules["train"]).isdisjoint(modules["test"]) and set(modules["valid"]).isdisjoint(modules["test"])
