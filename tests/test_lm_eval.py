"""Language models are scored on the whole split with the state carried through the text (issue 16)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import gatelab
from gatelab.train import evaluate, evaluate_stream


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    words = ["the", "gate", "opens", "and", "closes", "slowly", "while", "memory", "fades", "."]
    text = " ".join(rng.choice(words) for _ in range(1500))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return gatelab.tasks.get(f"charlm:{path}", seq_len=50)


def _model(task, hidden=16, seed=0):
    torch.manual_seed(seed)
    return gatelab.SequenceModel(task.input_size, task.output_size, cell="lstm", hidden_sizes=(hidden,), head="every",
                                 objective="cross_entropy", embedding_dim=8)


def test_a_uniform_model_scores_log2_of_the_vocabulary_on_every_character(corpus):
    model = _model(corpus)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    want = math.log2(corpus.input_size)
    for lm_eval in ("carried", "chunked"):
        assert evaluate(model, corpus, "test", lm_eval=lm_eval)["bpc"] == pytest.approx(want, abs=1e-6)


def test_carried_state_equals_one_pass_over_the_whole_split(corpus):
    model = _model(corpus)
    ids = corpus.stream("test")
    with torch.no_grad():
        out, _ = model(corpus.one_hot(ids[:-1]).unsqueeze(0))  # the whole split as one sequence
        one_pass = float(F.cross_entropy(out[0], ids[1:], reduction="mean")) / math.log(2)
    carried = evaluate(model, corpus, "test", lm_eval="carried")["bpc"]
    assert carried == pytest.approx(one_pass, abs=1e-5)
    assert evaluate_stream(model, corpus, "test", chunk=7)["bpc"] == pytest.approx(carried, abs=1e-5)  # chunking is free
    chunked = evaluate(model, corpus, "test", lm_eval="chunked")["bpc"]
    assert abs(chunked - carried) > 1e-4  # a model with memory: the zero state at every chunk costs something


def test_final_scores_cover_the_whole_split_and_name_the_form(corpus, tmp_path):
    cfg = gatelab.config.from_dict({
        "name": "lm", "task": {"name": corpus.name, "seq_len": 50},
        "model": {"cell": "gru", "hidden_sizes": [12], "embedding_dim": 8},
        "train": {"steps": 6, "batch_size": 8, "eval_every": 3, "eval_items": 2, "threads": 1},
    })
    run = gatelab.fit(cfg, run_dir=tmp_path / "lm", quiet=True)
    s = run.summary
    assert s["lm_eval"] == "carried" and s["evaluated_items"] == "all"
    model = run.model
    for split in ("val", "test"):
        assert s["final"][split]["bpc"] == pytest.approx(evaluate_stream(model, run.task, split)["bpc"], abs=1e-6)
        assert s["final_chunked"][split]["bpc"] == pytest.approx(
            evaluate(model, run.task, split, lm_eval="chunked")["bpc"], abs=1e-6)
    scored = gatelab.train.evaluate_checkpoint(tmp_path / "lm" / "last.pt")
    assert scored["test"]["bpc"] == pytest.approx(evaluate_stream(model, run.task, "test")["bpc"], abs=1e-5)
    with pytest.raises(gatelab.config.ConfigError, match="train.lm_eval: expected one of 'carried', 'chunked'"):
        gatelab.config.load("configs/adding_quick.toml", ["train.lm_eval=stateful"])
