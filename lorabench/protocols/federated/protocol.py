"""The federated run body (``protocol=federated``): a Flower ServerApp driving simulated clients.

:func:`train_federated`, inside the run's record (lorabench.train.run_with_record):

1. builds the global model and method with the loop's pieces (``build_run_parts``,
   ``prepare_run``); its trained arrays (plus, for FedSVD, the frozen A's) are the global arrays;
2. with ``resume=auto``, continues from the newest round checkpoint (lorabench.protocols.state);
3. runs Flower's simulation (``flwr.simulation.run_simulation``, Ray backend): the strategy of
   ``protocol.federated.aggregation`` (lorabench.protocols.federated.aggregation), wrapped in
   Flower's client-side fixed-clipping DP strategy when ``dp_target_epsilon`` is set, sends the
   global arrays to the clients (lorabench.protocols.federated.client) and aggregates their replies;
4. after each round evaluates the global model on the eval split (``evaluate``), appends the
   round's entry to ``record["protocol_report"]["rounds"]`` (metrics, mean client loss, bytes each
   way, epsilon spent) and checkpoints the round;
5. finishes the record as a single run does (``finish_record``: the saved adapter, the analysis).

In a federated record ``step`` counts rounds: the history, the train log (mean client loss) and
checkpoints are per round. ``train.max_steps`` and ``train.eval_every`` are not used: every client
trains ``local_steps`` steps per round and the global model is evaluated after every round; the
run's learning-rate schedule spans ``rounds × local_steps`` client steps.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no events sent to Flower's servers

import torch  # noqa: E402

from lorabench.protocols.federated.aggregation import AGGREGATIONS  # noqa: E402
from lorabench.protocols.federated.client import WEIGHT_KEY, client_app, frozen_checksum  # noqa: E402
from lorabench.protocols.federated.partition import label_of, partition  # noqa: E402
from lorabench.protocols.federated.privacy import (  # noqa: E402
    ACCOUNTANT,
    FIDELITY,
    epsilon_after,
    noise_multiplier_for,
)
from lorabench.protocols.state import newest_protocol_state, save_protocol_state  # noqa: E402
from lorabench.results.record import config_hash  # noqa: E402

STATE_NAME = "round"
LOCATION_KEYS = (("dataset", "data_dir"), ("dataset", "eval_data_dir"), ("model", "name_or_path"))


def _fault_injection_round() -> int | None:
    """LORABENCH_FAULT_AT_ROUND=k: the run sends itself SIGTERM after round k (resume tests)."""
    value = os.environ.get("LORABENCH_FAULT_AT_ROUND")
    return int(value) if value else None


def _absolute_locations(cfg_dict: dict) -> dict:
    """The config the client processes build from, with local paths made absolute (a simulation
    worker need not start in this process's working directory). Not recorded."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg_dict.items()}
    for section, key in LOCATION_KEYS:
        value = out[section].get(key)
        if value and Path(value).expanduser().exists():
            out[section][key] = str(Path(value).expanduser().resolve())
    return out


def _quiet_flower() -> None:
    """Flower's per-round INFO lines and its notes on choices made on purpose (no client-side
    evaluation; ``run_simulation``, the Python entry point of the simulation engine, deprecated in
    favour of the ``flwr run`` CLI) are not shown; errors are."""
    logging.getLogger("flwr").setLevel(logging.ERROR)


@dataclasses.dataclass
class Server:
    """The server's side of the run: the global model (a prepared lorabench Run), the global keys
    and their byte sizes, the partition, the DP noise multiplier, the rounds done and the report."""

    session: object
    run: object
    keys: list[str]
    uplink_keys: list[str]
    bytes_of: dict[str, int]
    report: dict
    noise_multiplier: float | None
    done: int = 0

    @property
    def fed(self):
        return self.run.cfg.protocol.federated

    def global_arrays(self) -> dict[str, torch.Tensor]:
        params = dict(self.run.accelerator.unwrap_model(self.run.model).named_parameters())
        return {k: params[k].detach().cpu().clone() for k in self.keys}

    def load(self, arrays: dict[str, torch.Tensor]) -> None:
        params = dict(self.run.accelerator.unwrap_model(self.run.model).named_parameters())
        with torch.no_grad():
            for k, v in arrays.items():
                params[k].copy_(v)

    def sampled(self) -> int:
        return self.fed.clients_per_round or self.fed.clients

    def round_entry(self, global_round: int, metrics: dict, client_metrics: list[dict]) -> dict:
        """One round of the record: the global metrics, the clients' mean loss, bytes each way and
        epsilon spent so far (None without DP)."""
        m = self.sampled()
        epsilon = None
        if self.noise_multiplier is not None:
            epsilon = epsilon_after(self.noise_multiplier, self.fed.dp_delta, global_round)
        losses = [c["train-loss"] for c in client_metrics]
        return {
            "round": global_round,
            "metrics": metrics,
            "client_loss": sum(losses) / len(losses) if losses else None,
            "clients": len(client_metrics),
            "downlink_bytes": m * sum(self.bytes_of[k] for k in self.keys),
            "uplink_bytes": m * sum(self.bytes_of[k] for k in self.uplink_keys),
            "epsilon": epsilon,
        }


def _open_server(session) -> Server:
    from lorabench.train import build_run_parts, prepare_run

    cfg, spec, fed = session.cfg, session.spec, session.cfg.protocol.federated
    parts = build_run_parts(cfg, spec, session.task, session.accelerator, session.record)
    run = prepare_run(parts, session.accelerator, session.recorder, session.tracker, session.stop, session.state.timers)
    model = run.accelerator.unwrap_model(run.model)
    named = dict(model.named_parameters())
    trained = [n for n, p in named.items() if p.requires_grad]
    frozen_a = [n for n, p in named.items() if ".lora_A." in n and not p.requires_grad]
    aggregation = AGGREGATIONS.get(fed.aggregation, where="protocol.federated.aggregation")
    keys = aggregation.global_keys(trained, frozen_a)
    labels = [label_of(e) for e in parts.splits.train]
    split = partition(labels, fed.clients, fed.partition, cfg.seed, fed.dirichlet_alpha, cfg.hardware.micro_batch_size)
    noise = noise_multiplier_for(fed.dp_target_epsilon, fed.dp_delta, fed.rounds) if fed.dp_target_epsilon else None
    import flwr
    import ray

    report = {
        "name": "federated",
        "aggregation": fed.aggregation,
        "engine": f"flower {flwr.__version__} simulation, {fed.backend} {ray.__version__} backend",
        "clients": fed.clients,
        "clients_per_round": fed.clients_per_round or fed.clients,
        "rounds": fed.rounds,
        "local_steps": fed.local_steps,
        "partition": fed.partition,
        "dirichlet_alpha": fed.dirichlet_alpha if fed.partition == "dirichlet" else None,
        "client_sizes": [len(p) for p in split],
        "client_labels": [dict(sorted(Counter(str(labels[i]) for i in p).items())) for p in split],
        "global_arrays": len(keys),
        "trained_arrays": len(trained),
        "dp": None
        if noise is None
        else {
            "target_epsilon": fed.dp_target_epsilon,
            "delta": fed.dp_delta,
            "clip": fed.dp_clip,
            "noise_multiplier": noise,
            "accountant": ACCOUNTANT,
            "mechanism": "flower DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod",
            "fidelity": FIDELITY,
        },
        "fidelity": aggregation.fidelity.describe(),
        "target": fed.target,
        "rounds_to_target": None,
        "history": [],
    }
    session.record["protocol_report"] = report
    if session.accelerator.is_main_process:
        dp = f", DP epsilon {fed.dp_target_epsilon} (noise multiplier {noise:.3f})" if noise else ""
        print(
            f"[lorabench] federated: {fed.clients} clients ({fed.partition}, sizes {report['client_sizes']}), "
            f"{fed.rounds} rounds x {fed.local_steps} local steps, {report['clients_per_round']} clients/round, "
            f"{fed.aggregation}{dp}; {report['engine']}"
        )
    bytes_of = {k: named[k].numel() * named[k].element_size() for k in keys}
    return Server(session, run, keys, trained, bytes_of, report, noise)


def _restore(server: Server) -> dict[str, torch.Tensor]:
    """With ``resume=auto``, the newest round checkpoint into the server (arrays, rounds done, the
    record's lists); the initial global arrays otherwise. Binds the state's lists into the record."""
    session, state = server.session, server.session.state
    record = session.record
    arrays = server.global_arrays()
    found = newest_protocol_state(server.run.run_dir, STATE_NAME) if server.run.cfg.resume == "auto" else None
    if found:
        tensors, saved = found
        arrays = {k: tensors[k] for k in server.keys}
        server.load(arrays)
        state.load_state_dict({**saved["train_state"], "step": saved["round"]})
        server.done = saved["round"]
        server.report["history"] = saved["history"]
        server.report["rounds_to_target"] = saved["rounds_to_target"]
        record["resumed_from"].append({"round": server.done, "kind": "protocol_state"})
        print(f"[lorabench] resuming {record['run_id']} after round {server.done}")
    record.update(history=state.history, train_log=state.train_log, samples=state.samples)
    session.recorder.write()
    return arrays


def _evaluate_round(server: Server, strategy, fault_round: int | None):
    """Flower's ``evaluate_fn``: after each round, the global model scored, recorded, checkpointed."""
    from flwr.app import MetricRecord

    from lorabench.train import RunCanceled, evaluate

    session, state = server.session, server.session.state

    def evaluate_fn(server_round: int, arrays) -> MetricRecord | None:
        if server_round == 0:  # Flower's evaluation before the first round: not needed
            return None
        state.timers.stop()
        global_round = server.done + server_round
        server.load(arrays.to_torch_state_dict())
        state.step = session.recorder.step = global_round
        clients = getattr(strategy, "strategy", strategy).client_metrics
        loss = sum(c["train-loss"] for c in clients) / len(clients)
        state.tokens += int(sum(c.get("tokens", 0) for c in clients))
        state.train_log.append({"step": global_round, "loss": loss, "lr": None})
        metrics = evaluate(server.run, state)
        entry = server.round_entry(global_round, metrics, clients)
        server.report["history"].append(entry)
        primary = session.record["metrics"]["primary"]
        target = server.fed.target
        if target is not None and server.report["rounds_to_target"] is None and metrics[primary] >= target:
            server.report["rounds_to_target"] = global_round
        if session.tracker:
            session.tracker.log({"fed/client_loss": loss, "fed/epsilon": entry["epsilon"] or 0.0}, step=global_round)
        session.recorder.write()
        save_protocol_state(
            server.run.run_dir,
            STATE_NAME,
            global_round,
            server.global_arrays(),
            {
                "round": global_round,
                "train_state": state.state_dict(),
                "history": server.report["history"],
                "rounds_to_target": server.report["rounds_to_target"],
                "config_hash": config_hash(dataclasses.asdict(server.run.cfg)),
            },
            keep=server.run.cfg.checkpoint.keep,
        )
        if global_round == fault_round:
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_for(lambda: session.stop.signal_name is not None)  # the handler runs on the main thread
        if session.stop.signal_name:
            raise RunCanceled(f"received {session.stop.signal_name} after round {global_round}")
        state.timers.start()
        return MetricRecord({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

    return evaluate_fn


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def _strategy(server: Server, checksum: float):
    fed, cfg = server.fed, server.run.cfg
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    m = server.sampled()
    strategy = AGGREGATIONS.get(fed.aggregation, where="protocol.federated.aggregation")(
        seed=cfg.seed,
        offset=server.done,
        frozen_checksum=checksum,
        fraction_train=m / fed.clients,
        min_train_nodes=m,
        min_available_nodes=fed.clients,
        fraction_evaluate=0.0,
        weighted_by_key=WEIGHT_KEY,
    )
    if server.noise_multiplier is None:
        return strategy
    return DifferentialPrivacyClientSideFixedClipping(strategy, server.noise_multiplier, fed.dp_clip, m)


def _simulate(server: Server, arrays: dict[str, torch.Tensor]) -> None:
    """Flower's simulation of the remaining rounds, the ServerApp in this process."""
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    cfg, fed = server.run.cfg, server.fed
    cfg_dict = dataclasses.asdict(cfg)
    _quiet_flower()
    model = server.run.accelerator.unwrap_model(server.run.model)
    strategy = _strategy(server, frozen_checksum(model, server.keys))
    evaluate_fn = _evaluate_round(server, strategy, _fault_injection_round())
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(arrays),
            num_rounds=fed.rounds - server.done,
            evaluate_fn=evaluate_fn,
        )

    clients = client_app(_absolute_locations(cfg_dict), config_hash(cfg_dict), dp=server.noise_multiplier is not None)
    _start_ray(fed, server.session.stop)
    backend = {"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": 0.0}}
    run_simulation(server_app=app, client_app=clients, num_supernodes=fed.clients, backend_config=backend)


def _start_ray(fed, stop) -> None:
    """Ray started here rather than by Flower's backend (which then uses it, and shuts it down at
    the end): the workers get this process's import path through their runtime environment, this
    process's PYTHONPATH is left as it was, and the run's signal handlers are put back after
    ``ray.init`` installed Ray's own, so a SIGTERM still ends the run after the round, checkpointed."""
    import ray

    if not ray.is_initialized():
        ray.init(
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}},
            num_cpus=max(1, min(os.cpu_count() or 1, fed.clients * fed.client_cpus)),
            include_dashboard=False,
            logging_level="error",
            log_to_driver=True,
        )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop._handle)


def train_federated(session) -> None:
    """The federated protocol, top to bottom (the module docstring)."""
    from lorabench.train import finish_record, record_training_cost

    server = _open_server(session)
    arrays = _restore(server)
    state = session.state
    if server.done < server.fed.rounds:
        session.stop.in_loop = True  # a signal is answered after the round, with a checkpoint
        state.timers.start()
        try:
            _simulate(server, arrays)
        finally:
            session.stop.in_loop = False
            if state.timers.stretch_start is not None:
                state.timers.stop()
    if state.step < server.fed.rounds:
        raise RuntimeError(f"the simulation ended after round {state.step} of {server.fed.rounds}")
    _keep_server_moved_arrays(server)
    record_training_cost(server.run, state)
    finish_record(server.run)


def _keep_server_moved_arrays(server: Server) -> None:
    """Global arrays the clients do not train but the server moves (FedSVD's A) are part of what the
    run learnt: marked trainable before the outputs are written, so ``adapter.safetensors`` holds
    them next to B (peft's folder holds every adapter weight anyway)."""
    moved = set(server.keys) - set(server.uplink_keys)
    for name, p in server.run.accelerator.unwrap_model(server.run.model).named_parameters():
        if name in moved:
            p.requires_grad_(True)
