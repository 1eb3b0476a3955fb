"""Optional experiment trackers. Runs are fully recorded without them (record.json); a tracker
only mirrors the config, the training log and the evaluations.

``tracker=wandb``: Weights & Biases (``WANDB_MODE=offline`` works without network; project from
``WANDB_PROJECT``, default ``lorabench``). ``tracker=mlflow``: MLflow (``MLFLOW_TRACKING_URI``,
default a file store ``<results_dir>/mlruns``; needs ``pip install mlflow-skinny`` or ``mlflow``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lorabench.errors import ConfigError
from lorabench.registry import Registry

TRACKERS = Registry("tracker")


def check_tracker(name: str) -> None:
    """Fail at validation, before any work, when the tracker's package is missing."""
    package = {"wandb": "wandb", "mlflow": "mlflow"}.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"tracker={name!r} needs the {package!r} package: pip install {package}"
            + ("-skinny" if package == "mlflow" else "")
        )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# the record's copy in a tracker's run (not record.json: ``lorabench table`` reads every record.json
# under a results folder, and the trackers' folders live there too)
TRACKED_RECORD = "lorabench_record.json"


def cost_summary(record: dict) -> dict:
    """The figures this tool compares methods by, for a tracker's run summary: final metrics, peak
    memory, throughput, trainable parameters, optimizer state and wall time (None values left out)."""
    cost = record.get("cost") or {}
    peak = cost.get("peak_memory") or {}
    peak_bytes = peak.get("cuda_allocated_bytes") or peak.get("cpu_peak_rss_bytes")
    state = cost.get("optimizer_state_bytes")
    figures = {
        "cost/peak_memory_mb": None if peak_bytes is None else peak_bytes / 2**20,
        "cost/tokens_per_s": cost.get("tokens_per_s"),
        "cost/trainable_params": cost.get("trainable_params"),
        "cost/total_params": cost.get("total_params"),
        "cost/optimizer_state_mb": None if state is None else state / 2**20,
        "cost/wall_time_s": cost.get("wall_time_s"),
        **{f"final/{k}": v for k, v in ((record.get("metrics") or {}).get("final") or {}).items()},
    }
    return {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@TRACKERS.register("wandb")
class WandbTracker:
    def __init__(self, run_id: str, config: dict, run_dir: Path, results_dir: Path):
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lorabench"),
            name=run_id,
            id=run_id,
            config=config,
            dir=str(run_dir),
            resume="allow",
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, ok: bool, record: dict, record_path: Path) -> None:
        """The cost figures into the run summary, the record as a run file, then close the run."""
        self.run.summary.update(cost_summary(record))
        (Path(self.run.dir) / TRACKED_RECORD).write_text(record_path.read_text(encoding="utf-8"), encoding="utf-8")
        self.run.finish(exit_code=0 if ok else 1)  # files in run.dir are the run's files


@TRACKERS.register("mlflow")
class MlflowTracker:
    def __init__(self, run_id: str, config: dict, run_dir: Path, results_dir: Path):
        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:  # a local file store, no server or database needed
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((results_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorabench"))
        mlflow.start_run(run_name=run_id)
        mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})

    def log(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in metrics.items()}, step=step)

    def finish(self, ok: bool, record: dict, record_path: Path) -> None:
        """The cost figures as metrics, the record as an artifact, then close the run."""
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in cost_summary(record).items()})
        self.mlflow.log_text(record_path.read_text(encoding="utf-8"), TRACKED_RECORD)
        self.mlflow.end_run(status="FINISHED" if ok else "FAILED")


class TrackerError(ConfigError):
    """The tracker the config names could not start (no login, unreachable server, ...)."""


def start_tracker(name: str, run_id: str, config: dict, run_dir: Path, results_dir: Path):
    """The started tracker, or None for ``tracker=none``. Raises TrackerError naming the tracker; the
    caller starts it inside the block that records failures, so the record says ``failed``."""
    if name == "none":
        return None
    try:
        return TRACKERS.get(name)(run_id, config, run_dir, results_dir)
    except Exception as exc:  # noqa: BLE001 - each tracker library has its own errors
        raise TrackerError(
            f"tracker={name!r} failed to start: {type(exc).__name__}: {exc} (tracker=none runs without it)"
        ) from exc
