"""Federated averaging of converted models: the factor-correct mean, what travels, the Flower strategy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wasi
from wasi.distributed import LOCAL_BUFFERS
from wasi.federated import (
    aggregate,
    client_update,
    factor_layers,
    global_state,
    load_global_state,
    mean_of_products,
    merge_state,
    naive_factor_mean,
    product_errors,
    upload_bytes,
)


def _clients(n: int, out: int = 12, k: int = 3, inp: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lefts = [torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))[0] for _ in range(n)]  # (O, k)
    rights = [torch.randn(k, inp, generator=g, dtype=torch.float64) for _ in range(n)]  # (k, I)
    return lefts, rights


def _dense_mean(lefts, rights, weights):
    total = sum(weights)
    return sum(w / total * (left @ right) for w, left, right in zip(weights, lefts, rights))  # (O, I)


def _truncated(m: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)  # (O, p), (p,), (p, I)
    return (u[:, :k] * s[:k]) @ vh[:k]  # (O, I)


@pytest.mark.parametrize("n,out,k,inp", [(3, 12, 3, 10), (4, 6, 2, 20), (2, 30, 5, 8)])
def test_mean_of_products_is_the_truncated_svd_of_the_dense_mean(n, out, k, inp):
    lefts, rights = _clients(n, out, k, inp)
    weights = [5.0, 1.0, 2.0, 7.0][:n]
    left, right = mean_of_products(lefts, rights, weights)
    assert left.shape == (out, k) and right.shape == (k, inp)
    torch.testing.assert_close(left @ right, _truncated(_dense_mean(lefts, rights, weights), k), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(left.T @ left, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)  # L orthonormal
    # the convention of functional.svd_factors: R = diag(s) V^T, rows orthogonal with decreasing norms
    gram = right @ right.T  # (k, k)
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-10)
    assert torch.all(torch.diff(torch.diagonal(gram)) <= 1e-12)


def test_equal_clients_give_back_their_product_exactly():
    lefts, rights = _clients(1, 16, 4, 9)
    left, right = mean_of_products(lefts * 3, rights * 3, [1, 2, 3])
    torch.testing.assert_close(left @ right, lefts[0] @ rights[0], rtol=1e-12, atol=1e-12)


def test_mean_is_exact_when_the_products_fit_the_rank():
    """Two rank-2 clients in a rank-4 layer: the mean of the products has rank 4 and is kept whole."""
    lefts, rights = _clients(2, 10, 2, 9)
    left, right = mean_of_products(lefts, rights, [1, 3], rank=4)
    assert left.shape == (10, 4)
    torch.testing.assert_close(left @ right, _dense_mean(lefts, rights, [1, 3]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(left.T @ left, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_weights_are_sample_counts():
    lefts, rights = _clients(2, 8, 2, 7)
    # client 1 has three times the samples of client 0: weights 1/4 and 3/4, whatever their scale
    expected = _truncated(0.25 * lefts[0] @ rights[0] + 0.75 * lefts[1] @ rights[1], 2)
    for weights in ([1, 3], [10, 30], [0.5, 1.5]):
        left, right = mean_of_products(lefts, rights, weights)
        torch.testing.assert_close(left @ right, expected, rtol=1e-10, atol=1e-10)
    left, right = mean_of_products(lefts, rights, [3, 1])
    assert not torch.allclose(left @ right, expected, atol=1e-3)


def test_naive_mean_of_factors_is_not_the_mean_of_products():
    """Client 1 holds client 0's layer with the basis rotated (as a QR step does): same product."""
    lefts, rights = _clients(1, 8, 3, 6)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    l2, r2 = lefts[0] @ rotation, rotation.T @ rights[0]
    torch.testing.assert_close(l2 @ r2, lefts[0] @ rights[0])
    naive_l, naive_r = naive_factor_mean([lefts[0], l2], [rights[0], r2], [1, 1])
    exact_l, exact_r = mean_of_products([lefts[0], l2], [rights[0], r2], [1, 1])
    product = lefts[0] @ rights[0]
    torch.testing.assert_close(exact_l @ exact_r, product, rtol=1e-12, atol=1e-12)
    error = torch.linalg.matrix_norm(naive_l @ naive_r - product) / torch.linalg.matrix_norm(product)
    assert error > 0.1
    # the same with a sign flip of one column, which QR alone may produce: that component vanishes
    flip = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    naive_l, naive_r = naive_factor_mean([lefts[0], lefts[0] @ flip], [rights[0], flip @ rights[0]], [1, 1])
    torch.testing.assert_close(naive_l[:, 0], torch.zeros(8, dtype=torch.float64))


def test_product_errors_measure_both_rules():
    lefts, rights = _clients(3, 12, 3, 10)
    updates = [{"fc.left": left, "fc.right": right, "fc.bias": torch.ones(12, dtype=torch.float64)}
               for left, right in zip(lefts, rights)]
    errors = product_errors(updates, [1, 2, 3], factors={"fc": 3})
    mean = _dense_mean(lefts, rights, [1, 2, 3])
    expected = torch.linalg.matrix_norm(_truncated(mean, 3) - mean) / torch.linalg.matrix_norm(mean)
    assert errors["fc"]["products"] == pytest.approx(expected.item(), rel=1e-8)
    assert errors["fc"]["factors"] > errors["fc"]["products"]  # Eckart-Young: no rank-3 matrix is closer
    start = {"fc.left": lefts[0], "fc.right": 0.5 * rights[0]}
    relative = product_errors(updates, [1, 2, 3], factors={"fc": 3}, start=start)["fc"]
    change = torch.linalg.matrix_norm(mean - lefts[0] @ (0.5 * rights[0]))
    assert relative["products_of_change"] == pytest.approx(
        errors["fc"]["products"] * torch.linalg.matrix_norm(mean).item() / change.item(), rel=1e-8)


def test_mismatched_factors_are_rejected_with_their_shapes():
    lefts, rights = _clients(2, 8, 3, 6)
    with pytest.raises(ValueError, match=r"client 1 sent factors of shapes \(8, 2\)"):
        mean_of_products([lefts[0], lefts[1][:, :2]], [rights[0], rights[1][:2]], [1, 1], name="fc")
    with pytest.raises(ValueError, match="do not multiply"):
        mean_of_products([lefts[0]], [rights[0][:2]], [1])
    with pytest.raises(ValueError, match="positive"):
        mean_of_products(lefts, rights, [1, 0])
    with pytest.raises(ValueError, match="2 weights for 1 clients"):
        mean_of_products(lefts[:1], rights[:1], [1, 1])
    with pytest.raises(ValueError, match=r"rank must be in \[1, 6\]"):
        mean_of_products(lefts, rights, [1, 1], rank=7)
    update = {"fc.left": lefts[0], "fc.right": rights[0]}
    with pytest.raises(ValueError, match="'fc' has rank 4"):
        aggregate([update, update], [1, 1], factors={"fc": 4})
    with pytest.raises(ValueError, match="client 1 sent other tensors"):
        aggregate([update, {"fc.left": lefts[1]}], [1, 1], factors={"fc": 3})
    with pytest.raises(ValueError, match="fc.right: client 1 sent shape"):
        aggregate([update, {"fc.left": lefts[1], "fc.right": rights[1][:, :5]}], [1, 1], factors={})
    with pytest.raises(ValueError, match="never averaged"):
        aggregate([{**update, "fc.basis_0": torch.ones(2, 2)}] * 2, [1, 1], factors={"fc": 3})
    with pytest.raises(ValueError, match="rule must be one of"):
        aggregate([update], [1], factors={"fc": 3}, rule="mean")
    with pytest.raises(ValueError, match="no client updates"):
        aggregate([], [], factors={})


# ---------------------------------------------------------------- on a converted model
def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    wasi.convert(model, wasi.WASIConfig(rank=4, target="all-linear"), filter_fn=lambda m, fqn: fqn == "0")
    return model


def _train(model: nn.Module, seed: int, steps: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x, y = torch.randn(8, 5, 16, generator=g), torch.randint(0, 4, (8, 5), generator=g)  # (B, N, I)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_clients_send_trainable_tensors_and_keep_their_activation_bases():
    server = _model()
    factors = factor_layers(server)
    assert factors == {"0": 4}
    sent = global_state(server)
    assert not any(name.rpartition(".")[2] in LOCAL_BUFFERS for name in sent)
    assert "0.step" in sent and "0.left" in sent
    clients = [_train(load_global_state(_model(seed=9), sent), seed=i) for i in range(3)]
    bases = [c[0].basis_0.clone() for c in clients]
    assert bases[0].numel() > 0 and not torch.equal(bases[0], bases[1])
    updates = [client_update(c) for c in clients]
    assert set(updates[0]) == {"0.left", "0.right", "0.bias", "2.weight", "2.bias"}
    assert upload_bytes(updates[0]) == 4 * (32 * 4 + 4 * 16 + 32 + 4 * 32 + 4)
    averaged = aggregate(updates, [8, 8, 16], factors=factors)
    new = merge_state(sent, averaged)
    assert torch.equal(new["0.step"], sent["0.step"])  # weight-side counters: the server's
    torch.testing.assert_close(new["2.weight"], (updates[0]["2.weight"] + updates[1]["2.weight"]
                                                 + 2 * updates[2]["2.weight"]) / 4)
    for client, basis in zip(clients, bases):
        load_global_state(client, new)
        assert torch.equal(client[0].basis_0, basis)  # untouched by the server's state
        torch.testing.assert_close(client[0].effective_weight(), new["0.left"] @ new["0.right"])
        client[0].eval()
        client(torch.randn(2, 5, 16))  # the loaded model runs


def test_loading_a_bad_global_state_names_it_and_changes_nothing():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = global_state(_model(seed=3))
    for bad, message in (({**good, "3.weight": torch.ones(1)}, "does not have"),
                         ({**good, "0.basis_0": torch.ones(2, 2)}, "never sent"),
                         ({**good, "0.left": torch.ones(32, 5)}, r"0.left \(32, 5\)")):
        with pytest.raises(ValueError, match=message):
            load_global_state(model, bad)
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="does not have"):
        merge_state(good, {"3.weight": torch.ones(1)})


# ---------------------------------------------------------------- the Flower strategy, in process
def _reply(update: dict, count: int):
    from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    content = RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord({"num-examples": count})})
    # a reply as a client sends it, built outside a Flower run (whose identity Message() would ask for)
    metadata = Metadata(run_id=1, message_id="", src_node_id=count, dst_node_id=0, reply_to_message_id="m",
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=content, metadata=metadata)


def test_flower_strategy_aggregates_factors_as_products_and_keeps_server_counters():
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from wasi.federated import factor_fedavg

    server = _model()
    sent = global_state(server)
    updates = [client_update(_train(load_global_state(_model(), sent), seed=i)) for i in range(3)]
    # client 2 holds its layer in a rotated basis (the same product, as after a re-orthonormalisation)
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(5)))[0]  # (k, k)
    updates[2]["0.left"], updates[2]["0.right"] = updates[2]["0.left"] @ rotation, rotation.T @ updates[2]["0.right"]
    counts = [10, 20, 5]
    strategy = factor_fedavg(factor_layers(server), min_available_nodes=1, min_train_nodes=1)
    strategy.sent[1] = {k: v.clone() for k, v in sent.items()}  # what configure_train records

    arrays, metrics = strategy.aggregate_train(1, [_reply(u, c) for u, c in zip(updates, counts)])
    state = arrays.to_torch_state_dict()
    expected = aggregate(updates, counts, factors={"0": 4})
    assert set(state) == set(sent)
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, msg=name)
    assert torch.equal(state["0.step"], sent["0.step"])
    assert strategy.uploads[1] == [upload_bytes(u) for u in updates]
    naive = FedAvg().aggregate_train(1, [_reply(u, c) for u, c in zip(updates, counts)])[0].to_torch_state_dict()
    assert not torch.allclose(naive["0.left"] @ naive["0.right"], state["0.left"] @ state["0.right"], atol=1e-4)
    # without WASI layers it is FedAvg
    dense = factor_fedavg({}, min_available_nodes=1)
    plain = dense.aggregate_train(1, [_reply(u, c) for u, c in zip(updates, counts)])[0].to_torch_state_dict()
    for name, value in naive.items():
        torch.testing.assert_close(plain[name], value, msg=name)
    with pytest.raises(ValueError, match="rule must be one of"):
        factor_fedavg({}, rule="median")
    assert isinstance(ConfigRecord(), ConfigRecord) and isinstance(arrays, ArrayRecord)


def test_strategy_without_flower_says_what_to_install(monkeypatch):
    import sys

    from wasi.federated import factor_fedavg

    for name in [n for n in sys.modules if n == "flwr" or n.startswith("flwr.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flwr", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"wasi\[federated\]"):
        factor_fedavg({})
