"""The federated client: Flower's ClientApp training the global arrays on one partition.

A simulated client is stateless between rounds, as Flower's simulation expects (a Ray worker may
serve any client in any round): each TRAIN message carries the global arrays and the round; the
client loads them into its copy of the model, trains ``local_steps`` optimizer steps with the loop's
own :func:`lorabench.train.optimizer_step` (fresh optimizer state each round, the learning rate
where the run's schedule over rounds × local_steps stands), and replies with the arrays it was sent
(now trained) and its example count. Its data order and RNGs (dropout) are seeded by (seed, client, round),
so a resumed run, or another worker serving the client, redraws the same batches and masks.

The model, method and partitions are built once per worker process from the run's config, with
the same seed as the server's, so frozen weights (LoRA's A under FFA-LoRA, a random head) agree;
each reply carries a checksum of the client's frozen weights that the server compares with its own.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from torch.utils.data import DataLoader
from transformers import get_scheduler

from lorabench.protocols.federated.aggregation import ROUND_KEY
from lorabench.protocols.federated.partition import label_of, partition

WEIGHT_KEY = "num-examples"
_RUNTIMES: dict[str, "ClientRuntime"] = {}  # one per worker process and run


def frozen_checksum(model: torch.nn.Module, communicated: list[str]) -> float:
    """A float64 sum of every frozen parameter the server does not send (``communicated``): equal
    in two processes that built the same model."""
    skip = set(communicated)
    with torch.no_grad():
        return float(
            sum(p.double().sum() for n, p in model.named_parameters() if not p.requires_grad and n not in skip)
        )


@dataclasses.dataclass
class ClientRuntime:
    """One worker's copy of the run: the model with the method applied, its optimizer, the
    training features of every client's partition, and a training state for the loop's pieces."""

    run: Any  # lorabench.train.Run (no recorder: a client keeps no record)
    features: list  # the run's training features
    parts: list[list[int]]  # example indices of every client
    local_steps: int
    rounds: int

    @classmethod
    def build(cls, cfg_dict: dict, threads: int) -> "ClientRuntime":
        logging.getLogger("flwr").setLevel(logging.ERROR)
        from accelerate import Accelerator

        from lorabench.methods.build import apply_method
        from lorabench.registry import DATASETS
        from lorabench.train import Run, StopFlag, build_run_parts
        from lorabench.validate import build_run

        torch.set_num_threads(threads)
        cfg, spec = build_run(cfg_dict)
        fed = cfg.protocol.federated
        task = DATASETS.get(cfg.dataset.name, where="dataset")
        parts = build_run_parts(cfg, spec, task)
        built = apply_method(parts.model, spec, parts.ctx)
        accelerator = Accelerator(cpu=cfg.hardware.device == "cpu", step_scheduler_with_optimizer=False)
        model, optimizer = accelerator.prepare(built.model, built.optimizer)
        run = Run(parts, model, optimizer, None, None, parts.loader, accelerator, None, None, StopFlag(), None)
        labels = [label_of(e) for e in parts.splits.train]
        split = partition(
            labels, fed.clients, fed.partition, cfg.seed, fed.dirichlet_alpha, cfg.hardware.micro_batch_size
        )
        return cls(run, list(parts.features), split, fed.local_steps, fed.rounds)

    def load(self, arrays: dict[str, torch.Tensor]) -> None:
        """The global arrays into the model (each key must name one of its parameters)."""
        params = dict(self.run.accelerator.unwrap_model(self.run.model).named_parameters())
        missing = [k for k in arrays if k not in params]
        if missing:
            raise KeyError(f"the server sent arrays this client's model lacks: {missing[:3]}")
        with torch.no_grad():
            for key, value in arrays.items():
                params[key].copy_(value)

    def trained(self, keys: list[str]) -> dict[str, torch.Tensor]:
        params = dict(self.run.accelerator.unwrap_model(self.run.model).named_parameters())
        return {k: params[k].detach().cpu().clone() for k in keys}

    def local_training(self, client: int, global_round: int) -> tuple[float, int, int]:
        """``local_steps`` optimizer steps on this client's partition; (mean loss, examples, tokens)."""
        from accelerate.utils import set_seed

        from lorabench.train import TrainState, optimizer_step

        run, cfg = self.run, self.run.cfg
        seed = cfg.seed * 1_000_003 + client * 10_007 + global_round
        set_seed(seed)  # dropout and any sampling: the same whichever worker serves this client now
        run.optimizer.state.clear()  # every round's local training starts with fresh moments
        run.scheduler = self._scheduler(global_round)
        loader = DataLoader(
            [self.features[i] for i in self.parts[client]],
            batch_size=cfg.hardware.micro_batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=run.parts.loader.collate_fn,
            generator=torch.Generator().manual_seed(seed),
        )
        run.batches = _endless(loader)
        state, losses = TrainState(), []
        run.model.train()
        while state.step < self.local_steps:
            loss = optimizer_step(run, state)
            if loss is not None:
                losses.append(loss)
        return sum(losses) / len(losses), len(self.parts[client]), state.tokens

    def _scheduler(self, global_round: int):
        """The run's schedule over rounds × local_steps optimizer steps, at this round's start."""
        cfg, total = self.run.cfg, self.rounds * self.local_steps
        scheduler = get_scheduler(
            cfg.train.schedule,
            self.run.optimizer,
            num_warmup_steps=math.ceil(cfg.train.warmup_ratio * total),
            num_training_steps=total,
        )
        with warnings.catch_warnings():  # stepping the schedule forward before any optimizer step
            warnings.simplefilter("ignore")
            for _ in range((global_round - 1) * self.local_steps):
                scheduler.step()
        return scheduler


def _endless(loader: DataLoader):
    while True:
        yield from loader


def runtime(cfg_dict: dict, key: str, threads: int) -> ClientRuntime:
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one run per worker at a time
        _RUNTIMES[key] = ClientRuntime.build(cfg_dict, threads)
    return _RUNTIMES[key]


def client_app(cfg_dict: dict, key: str, dp: bool) -> ClientApp:
    """The ClientApp of the run whose resolved config is ``cfg_dict`` (``key`` names it in the
    worker's cache). With ``dp`` the reply passes Flower's ``fixedclipping_mod`` (the update clipped
    to the norm the server's DP wrapper sends) and every client weighs 1, as the noise calibration
    of a uniform average assumes."""
    app = ClientApp(mods=[fixedclipping_mod] if dp else [])
    threads = cfg_dict["protocol"]["federated"]["client_cpus"]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client = int(context.node_config["partition-id"])
        config = msg.content["config"]
        global_round = int(config[ROUND_KEY])
        rt = runtime(cfg_dict, key, threads)
        sent = msg.content["arrays"].to_torch_state_dict()
        rt.load(sent)
        loss, examples, tokens = rt.local_training(client, global_round)
        metrics = {
            WEIGHT_KEY: 1 if dp else examples,
            "train-loss": loss,
            "examples": examples,
            "tokens": tokens,
            "frozen-checksum": frozen_checksum(rt.run.accelerator.unwrap_model(rt.run.model), list(sent)),
        }
        content = RecordDict({"arrays": ArrayRecord(rt.trained(list(sent))), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app
