"""Sequence models: heads read the right steps, stacks match torch layers, inputs and configs wire up."""

from __future__ import annotations

import pytest
import torch

import gatelab
from gatelab.config import ConfigError, ModelConfig
from gatelab.models import SequenceModel, build_model

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = [
    ("lstm", {}),  # native engine
    ("lstm", {"gate_activation": "hard_sigmoid"}),  # fused engine
    ("gru", {"gate_activation": "relu"}),
    ("rnn", {"activation": "relu"}),
    ("rnn", {"activation": "softsign"}),
    ("gated_state", {}),
]


def _batch(gen: torch.Generator, lengths: list[int], features: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(lengths)
    x = torch.randn(len(lengths), T, features, generator=gen)
    for b, n in enumerate(lengths):
        x[b, n:] = 0.0  # padding, as gatelab.tasks.collate pads
    return x, torch.tensor(lengths)


@pytest.mark.parametrize("cell,slots", CASES)
@pytest.mark.parametrize("head", ["last", "mean", "every"])
def test_padded_batch_equals_each_sequence_alone(cell, slots, head, gen):
    torch.manual_seed(0)
    model = SequenceModel(3, 2, cell=cell, hidden_sizes=(5, 4), head=head, **slots).eval()
    x, lengths = _batch(gen, [7, 3, 5, 1])
    out, _ = model(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone, _ = model(x[b : b + 1, :n])  # the oracle: no padding at all
        got = out[b, :n] if head == "every" else out[b]
        torch.testing.assert_close(got, alone[0], rtol=0, atol=1e-6)


def test_bidirectional_last_reads_forward_end_and_backward_start(gen):
    torch.manual_seed(0)
    model = SequenceModel(3, 2, cell="gru", hidden_sizes=(4,), head="last", bidirectional=True).eval()
    x, lengths = _batch(gen, [6, 2, 4])
    out, _ = model(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone, _ = model(x[b : b + 1, :n])
        torch.testing.assert_close(out[b], alone[0], rtol=0, atol=1e-6)


def test_stack_of_different_sizes_equals_torch_layers(gen):
    """Seed 001's SimpleRNN(64) -> SimpleRNN(32) -> Dense(1), small: two torch.nn.RNN and a Linear."""
    torch.manual_seed(0)
    model = SequenceModel(1, 1, cell="rnn", hidden_sizes=(6, 4), head="last")
    assert [(m.input_size, m.hidden_size) for m in model.layers] == [(1, 6), (6, 4)]
    rnn1, rnn2 = torch.nn.RNN(1, 6, batch_first=True), torch.nn.RNN(6, 4, batch_first=True)
    rnn1.load_state_dict(model.layers[0].state_dict())
    rnn2.load_state_dict(model.layers[1].state_dict())
    x = torch.randn(5, 10, 1, generator=gen)
    expected = model.head(rnn2(rnn1(x)[0])[0][:, -1])
    torch.testing.assert_close(model(x)[0], expected, rtol=0, atol=1e-6)


def test_token_ids_and_one_hot_rows_give_the_same_output(gen):
    torch.manual_seed(0)
    model = SequenceModel(7, 7, cell="lstm", hidden_sizes=(5,), head="every", embedding_dim=5, tie_weights=True,
                          objective="cross_entropy")
    assert model.head.weight is model.embedding.weight
    ids = torch.randint(0, 7, (3, 6), generator=gen)
    one_hot = torch.nn.functional.one_hot(ids, 7).float()
    torch.testing.assert_close(model(ids)[0], model(one_hot)[0], rtol=0, atol=0)
    plain = SequenceModel(7, 7, cell="gru", hidden_sizes=(5,), head="every")  # no embedding: ids are one-hot
    torch.testing.assert_close(plain(ids)[0], plain(one_hot)[0], rtol=0, atol=0)


def test_state_continues_across_calls(gen):
    """What truncated BPTT and sampling rely on: two calls carrying the state equal one call."""
    torch.manual_seed(0)
    model = SequenceModel(3, 2, cell="lstm", hidden_sizes=(4, 3), head="every", gate_activation="hard_sigmoid")
    x = torch.randn(2, 9, 3, generator=gen)
    whole, _ = model(x)
    first, state = model(x[:, :4])
    second, _ = model(x[:, 4:], None, state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=1e-6)


def test_cross_entropy_ignores_padded_targets():
    model = SequenceModel(2, 3, cell="rnn", hidden_sizes=(4,), head="every", objective="cross_entropy")
    out = torch.randn(2, 4, 3)
    y = torch.tensor([[0, 1, 2, 1], [2, 0, -100, -100]])
    expected = torch.nn.functional.cross_entropy(torch.cat([out[0], out[1, :2]]), torch.tensor([0, 1, 2, 1, 2, 0]))
    torch.testing.assert_close(model.criterion(out, y), expected)
    assert model.n_targets(y) == 6


def test_activation_slots_and_layer_options_reach_every_layer():
    model = SequenceModel(3, 1, cell="lstm", hidden_sizes=(4, 4), gate_activation="hard_sigmoid",
                          layer_options={"peephole": True}, forget_bias=1.0)
    for layer in model.layers:
        cell = layer.cells[0]
        assert cell.sigma_f.key == "hard_sigmoid" and cell.peephole
        assert layer.engine_name == "fused"
    assert model.engines == ["fused", "fused"]
    with pytest.raises(TypeError, match="RNN.__init__.. got an unexpected keyword argument 'gate_activation'"):
        SequenceModel(3, 1, cell="rnn", gate_activation="sigmoid")


def test_build_model_follows_the_task():
    adding = gatelab.tasks.get("adding", length=5, n_train=4, n_val=2, n_test=2)
    model = build_model(ModelConfig(cell="gru", hidden_sizes=(4,)), adding)
    assert (model.head_mode, model.objective, model.input_size, model.output_size) == ("last", "mse", 2, 1)
    copy = gatelab.tasks.get("copy", length=3, n_train=4, n_val=2, n_test=2)
    model = build_model(ModelConfig(), copy)
    assert (model.head_mode, model.objective, model.output_size) == ("every", "cross_entropy", 10)
    with pytest.raises(ConfigError, match="needs head 'every'"):
        build_model(ModelConfig(head="last"), copy)
    with pytest.raises(ConfigError, match="model.gate_activation: cell 'rnn' has no such slot"):
        ModelConfig(cell="rnn", gate_activation="sigmoid")
    with pytest.raises(ConfigError, match="unknown activation 'sigmod'"):
        ModelConfig(gate_activation={"f": "sigmod"})
    with pytest.raises(ConfigError, match=r"\[model\].*peepholes"):
        build_model(ModelConfig(options={"peepholes": True}), adding)


@pytest.mark.parametrize("head", ["max", "attention"])
def test_max_and_attention_heads_read_only_the_real_steps(head):
    torch.manual_seed(0)
    model = SequenceModel(3, 2, cell="gru", hidden_sizes=(5,), head=head, bidirectional=True)
    x = torch.randn(4, 6, 3)
    lengths = torch.tensor([6, 3, 1, 4])
    out, _ = model(x, lengths)
    changed = x.clone()
    changed[1, 3:] = 100.0  # what lies past a sequence's length must not matter
    torch.testing.assert_close(model(changed, lengths)[0], out, rtol=0, atol=1e-6)
    h, _ = model.layers[0](model.encode(x), lengths=lengths)  # (B, T, 2H), zero past each length
    for b, n in enumerate(lengths.tolist()):
        real = h[b, :n]
        if head == "max":
            want = real.max(0).values
        else:  # zero query at init: uniform weights, the mean; then a moved query by hand
            want = real.mean(0)
        torch.testing.assert_close(model._pool(h, lengths)[b], want, rtol=0, atol=1e-6)
    if head == "attention":
        with torch.no_grad():
            model.attention_query.copy_(torch.randn(10))
        w = torch.softmax(h[0, :6] @ model.attention_query, 0)
        torch.testing.assert_close(model._pool(h, lengths)[0], (w[:, None] * h[0, :6]).sum(0), rtol=0, atol=1e-6)
        loss = model(x, lengths)[0].sum()
        loss.backward()
        assert model.attention_query.grad is not None and model.attention_query.grad.abs().sum() > 0


def test_the_new_heads_train_from_a_config(tmp_path):
    import gatelab

    for head in ("max", "attention"):
        cfg = gatelab.config.load("configs/adding_quick.toml", [f"model.head={head}", "train.steps=3", "task.length=6",
                                                                 "task.n_train=40", "task.n_val=10", "task.n_test=10"])
        run = gatelab.fit(cfg, run_dir=tmp_path / head, quiet=True)
        assert run.model.head_mode == head and run.summary["final"]["test"]["mse"] > 0


def test_per_layer_settings_from_a_config_and_from_python(tmp_path):
    """Seed 004's model: ReLU candidate in the first LSTM only; the second keeps the shared settings."""
    import gatelab

    cfg = gatelab.config.load("configs/adding_quick.toml", [
        "model.hidden_sizes=[6, 5]", "model.gate_activation=hard_sigmoid",
        "model.layers=[{candidate_activation = \"relu\", zoneout = 0.1}, {}]",
        "train.steps=2", "task.length=6", "task.n_train=40", "task.n_val=10", "task.n_test=10"])
    run = gatelab.fit(cfg, run_dir=tmp_path / "per-layer", quiet=True)
    first, second = run.model.layers
    assert first.cells[0].phi is gatelab.activations.get("relu") and first.zoneout == (0.1, 0.1)
    assert second.cells[0].phi is gatelab.activations.get("tanh") and second.zoneout == (0.0, 0.0)
    assert first.cells[0].sigma_f.key == second.cells[0].sigma_f.key == "hard_sigmoid"  # shared where not replaced
    again = gatelab.config.load(run.run_dir / "config.toml")  # the resolved config round-trips
    assert again.model.layers == cfg.model.layers
    with pytest.raises(gatelab.config.ConfigError,
                       match=r"model.layers: expected one table per entry of hidden_sizes \(2\), got 1"):
        gatelab.config.load("configs/adding_quick.toml", ["model.hidden_sizes=[6, 5]", "model.layers=[{}]"])
    with pytest.raises(gatelab.config.ConfigError, match=r"model.layers\[0\].activation: cell 'lstm' has no such slot"):
        gatelab.config.load("configs/adding_quick.toml", ["model.layers=[{activation = \"relu\"}]"])
    model = SequenceModel(3, 1, cell="gru", hidden_sizes=(4, 4), per_layer=[{}, {"candidate_activation": "softsign"}])
    assert model.layers[1].cells[0].phi is gatelab.activations.get("softsign")
