"""Federated fine-tuning with Flower: WASI factors averaged as products, as factors, and dense FedAvg.

all-MiniLM-L6-v2 with a new head on BBC News (the seeded stratified 80/10/10 split of
``wasi train``). The training split's first ``--train-samples`` articles are dealt to
``--clients`` clients by a seeded Dirichlet(``--alpha``) draw over the labels (non-identical
shards); the server holds the validation split, whose first ``--fit-samples`` articles the WASI
factors are fitted to (the fitted init of ``wasi train``), and scores the global model on the test
split after every round. Three arms run the same rounds on the same shards, one after another,
each a Flower simulation (``flwr.simulation.run_simulation``, Ray backend, 1 CPU per client):

- ``dense``: the unconverted model, FedAvg (``wasi.federated.factor_fedavg`` with no WASI layer);
- ``wasi``: converted at ``WASIConfig(eps=...)`` (the library's default target, the MLP linears),
  factors averaged as the truncated SVD of the mean of the products;
- ``wasi-naive``: the same conversion, ``L`` and ``R`` averaged separately.

Every client trains one local epoch per round (AdamW, a fresh optimizer each round) and uploads its
trainable parameters; the token embeddings are frozen in every arm (``--train-embeddings`` trains
them: they are the same 11.7 M parameters in every arm and would dominate every upload). Bytes per
round = the bytes of the tensors every client uploaded, summed over the clients. For the WASI arms
each round also records, per layer, ``||L R - M|| / ||M||`` of both rules against the exact mean of
the products ``M`` (``wasi.federated.product_errors``). Writes one JSON with everything.

    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WASI_CACHE=...
    python benchmarks/federated.py --rounds 5 --clients 4 --out docs/results/federated/minilm-bbc.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wasi.config import WASIConfig
from wasi.convert import convert
from wasi.data import load_dataset, split_stratified
from wasi.federated import (
    client_update,
    factor_fedavg,
    factor_layers,
    global_state,
    load_global_state,
    product_errors,
)
from wasi.training.batches import Split, make_batch, make_split
from wasi.training.methods import freeze_embeddings
from wasi.training.models import build_model, model_logits

ARMS = {"dense": None, "wasi": "products", "wasi-naive": "factors"}


def dirichlet_shards(labels: torch.Tensor, clients: int, alpha: float, seed: int) -> list[torch.Tensor]:
    """Deal the sample indices to ``clients`` by class, in Dirichlet(``alpha``) proportions per class."""
    g = torch.Generator().manual_seed(seed)
    shards: list[list[int]] = [[] for _ in range(clients)]
    concentration = torch.full((clients,), float(alpha))
    for label in labels.unique().tolist():
        idx = (labels == label).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        gamma = torch._standard_gamma(concentration, generator=g)  # a Dirichlet draw: normalised gammas
        share = gamma / gamma.sum()
        cuts = (share.cumsum(0) * len(idx)).round().long().tolist()
        start = 0
        for client, end in enumerate(cuts):
            shards[client] += idx[start:end].tolist()
            start = end
    return [torch.tensor(sorted(s), dtype=torch.int64) for s in shards]


def subset(split: Split, idx: torch.Tensor) -> Split:
    return Split(len(idx), split.labels[idx], tokens=[split.tokens[i] for i in idx.tolist()])


def build(arm: str, num_classes: int, ranks: dict | None, args, calibration=None):
    """The model of an arm: the pretrained MiniLM, converted for the WASI arms (fitted, or shells for ``ranks``)."""
    torch.manual_seed(args.seed)  # the same new head in every arm and on every client
    bundle = build_model("minilm", num_classes=num_classes)
    model = bundle.model
    if ARMS[arm] is not None:
        config = WASIConfig(eps=args.eps, seed=args.seed)
        if ranks is None:
            convert(model, config, calibration=lambda: calibration(model))
        else:  # a client: the factors come from the server
            convert(model, config, ranks=ranks, initialise=False)
    if not args.train_embeddings:
        freeze_embeddings(model)
    return bundle, model


def accuracy(model, split: Split, pad_id: int, batch_size: int = 64) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, split.size, batch_size):
            batch = make_batch(split, torch.arange(start, min(start + batch_size, split.size)), pad_id, "cpu")
            right += (model_logits(model, batch).argmax(-1) == batch["labels"]).sum().item()
    return right / split.size


def client_app(arm: str, num_classes: int, ranks: dict | None, shard_file: str, args, pad_id: int):
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()
    cached: dict = {}  # per worker process: one model, its initial activation buffers

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        if "model" not in cached:
            _, model = build(arm, num_classes, ranks, args)
            cached["model"] = model
            cached["fresh"] = {k: v.clone() for k, v in model.state_dict().items() if k not in global_state(model)}
            cached["shards"] = torch.load(shard_file, weights_only=False)
        model = cached["model"]
        client = int(context.node_config["partition-id"])
        shard = cached["shards"][client]
        # this client's own activation side: kept in its node state between rounds
        local = context.state["local"].to_torch_state_dict() if "local" in context.state else cached["fresh"]
        model.load_state_dict(local, strict=False)
        load_global_state(model, msg.content["arrays"].to_torch_state_dict())
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        round_ = int(msg.content["config"]["server-round"])
        order = torch.randperm(shard.size, generator=torch.Generator().manual_seed(args.seed * 1000 + round_ * 10 + client))
        losses = []
        for start in range(0, shard.size, args.batch_size):
            batch = make_batch(shard, order[start:start + args.batch_size], pad_id, "cpu")
            loss = F.cross_entropy(model_logits(model, batch), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        state = model.state_dict()
        context.state["local"] = ArrayRecord({k: state[k].clone() for k in cached["fresh"]}) if cached["fresh"] \
            else ArrayRecord()
        content = RecordDict({"arrays": ArrayRecord(client_update(model)),
                              "metrics": MetricRecord({"num-examples": shard.size,
                                                       "train-loss": sum(losses) / len(losses)})})
        return Message(content=content, reply_to=msg)

    return app


def run_arm(arm: str, args, data: dict) -> dict:
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    num_classes, pad_id, test = data["num_classes"], data["pad_id"], data["test"]
    fit = data["fit"]

    def calibration(model):
        for start in range(0, fit.size, args.batch_size):
            model_logits(model, make_batch(fit, torch.arange(start, min(start + args.batch_size, fit.size)), pad_id, "cpu"))

    began = time.perf_counter()
    _, server = build(arm, num_classes, None, args, calibration=calibration)
    factors = factor_layers(server)
    ranks = factors if ARMS[arm] is not None else None
    record: dict = {"arm": arm, "layers": factors, "rounds": [], "convert_s": time.perf_counter() - began}
    record["accuracy_start"] = accuracy(server, test, pad_id)
    strategy = factor_fedavg(factors, rule=ARMS[arm] or "products", fraction_evaluate=0.0,
                             min_train_nodes=args.clients, min_available_nodes=args.clients)
    aggregate_train = strategy.aggregate_train

    def recording(server_round, replies):
        replies = list(replies)
        if factors:
            contents = [m.content for m in replies if not m.has_error()]
            updates = [c["arrays"].to_torch_state_dict() for c in contents]
            weights = [float(c["metrics"]["num-examples"]) for c in contents]
            record.setdefault("errors", {})[server_round] = product_errors(
                updates, weights, factors=factors, start=strategy.sent[server_round])
        return aggregate_train(server_round, replies)

    strategy.aggregate_train = recording

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_global_state(server, arrays.to_torch_state_dict())
        score = accuracy(server, test, pad_id)
        if server_round > 0:
            record["rounds"].append({"round": server_round, "accuracy": score,
                                     "upload_bytes": sum(strategy.uploads[server_round]),
                                     "client_bytes": strategy.uploads[server_round],
                                     "elapsed_s": time.perf_counter() - began})
            print(f"{arm}: round {server_round}: test accuracy {score:.4f}, "
                  f"uploaded {sum(strategy.uploads[server_round]) / 2**20:.1f} MiB", flush=True)
        return MetricRecord({"accuracy": score})

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(global_state(server)), num_rounds=args.rounds,
                       train_config=ConfigRecord({}), evaluate_fn=evaluate)

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": args.cpus, "num_gpus": 0, "include_dashboard": False}}
    run_simulation(server_app=server_app, client_app=client_app(arm, num_classes, ranks, data["shard_file"], args, pad_id),
                   num_supernodes=args.clients, backend_name="ray", backend_config=backend)
    record["total_s"] = time.perf_counter() - began
    if len(record["rounds"]) != args.rounds:
        raise RuntimeError(f"{arm}: the simulation finished {len(record['rounds'])} of {args.rounds} rounds")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {list(ARMS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration over the labels")
    parser.add_argument("--train-samples", type=int, default=800, help="training articles dealt to the clients")
    parser.add_argument("--fit-samples", type=int, default=64, help="server-side articles the factors are fitted to")
    parser.add_argument("--test-samples", type=int, default=None, help="score on this many test articles (default: all)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eps", type=float, default=WASIConfig().eps, help="energy of the WASI weight ranks")
    parser.add_argument("--train-embeddings", action="store_true")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use (1 per client at a time)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    if args.out.exists():
        parser.error(f"--out {args.out} exists; give another path")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    dataset = load_dataset("bbc-news")
    train, val, test = split_stratified(dataset, fractions=(0.8, 0.1, 0.1), seed=args.seed)
    bundle = build_model("minilm", num_classes=len(dataset.classes))
    pad_id = bundle.tokenizer.pad_token_id
    train = make_split(train, bundle, args.max_length)
    pool = torch.arange(min(args.train_samples, train.size))
    shards = [subset(train, pool[idx]) for idx in dirichlet_shards(train.labels[pool], args.clients, args.alpha, args.seed)]
    fit = make_split(val, bundle, args.max_length)
    fit = subset(fit, torch.arange(min(args.fit_samples, fit.size)))
    test = make_split(test, bundle, args.max_length)
    test = subset(test, torch.arange(min(args.test_samples or test.size, test.size)))
    del bundle
    counts = [[int((s.labels == c).sum()) for c in range(len(dataset.classes))] for s in shards]
    for i, row in enumerate(counts):
        print(f"client {i}: {sum(row)} articles, per class {row}")
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "classes": list(dataset.classes), "shard_counts": counts, "test_size": test.size,
              "torch_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"), "arms": []}
    with tempfile.TemporaryDirectory() as tmp:
        shard_file = str(Path(tmp) / "shards.pt")
        torch.save(shards, shard_file)
        data = {"num_classes": len(dataset.classes), "pad_id": pad_id, "test": test, "fit": fit, "shard_file": shard_file}
        for arm in arms:
            result["arms"].append(run_arm(arm, args, data))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print("\n| arm | layers factored | round | test accuracy | uploaded per round (MiB) |")
    print("|---|---|---|---|---|")
    for arm in result["arms"]:
        for r in arm["rounds"]:
            print(f"| {arm['arm']} | {len(arm['layers'])} | {r['round']} | {r['accuracy']:.4f} | "
                  f"{r['upload_bytes'] / 2**20:.2f} |")
    for arm in result["arms"]:
        for server_round, layers in arm.get("errors", {}).items():
            naive = [e["factors"] for e in layers.values()]
            svd = [e["products"] for e in layers.values()]
            print(f"{arm['arm']} round {server_round}: ||LR - M||/||M|| naive {min(naive):.3g}..{max(naive):.3g} "
                  f"(mean {sum(naive) / len(naive):.3g}), products {min(svd):.3g}..{max(svd):.3g}")
            naive = [e["factors_of_change"] for e in layers.values()]
            svd = [e["products_of_change"] for e in layers.values()]
            print(f"{arm['arm']} round {server_round}: ||LR - M||/||M - L0 R0|| naive {min(naive):.3g}..{max(naive):.3g} "
                  f"(mean {sum(naive) / len(naive):.3g}), products {min(svd):.3g}..{max(svd):.3g}")
    print(f"wrote {args.out}; ranks: {result['arms'][-1]['layers'] if result['arms'] else {}}; "
          f"nan check {math.isfinite(sum(r['accuracy'] for a in result['arms'] for r in a['rounds']))}")


if __name__ == "__main__":
    main()
