"""Run metrics: a JSONL log, a loss-curve PNG, and optional MLflow tracking to a local store."""
from __future__ import annotations

import json
import time
from pathlib import Path

from nima_edge.atomic import atomic_path
from nima_edge.errors import NimaError

METRICS = "metrics.jsonl"
PLOT = "loss.png"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlflow-artifacts"


class Tracker:
    """Appends one JSON object per event to OUT/metrics.jsonl; mirrors numbers to MLflow when asked.

    Only the main process tracks (the others get `enabled=False`). A resumed run appends to the same
    log; records of steps it repeats appear twice and the later one wins in `read_metrics`.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, mlflow: bool = False, params: dict | None = None,
                 resumed: bool = False):
        self.dir, self.enabled, self.mlflow = Path(run_dir), enabled, None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.dir / METRICS, "a", encoding="utf-8")
        if mlflow:
            self.mlflow = _start_mlflow(self.dir, params or {}, resumed)

    def log(self, event: str, step: int, **values) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"event": event, "step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.file.flush()
        if self.mlflow is not None:
            nums = {f"{event}/{k}": float(v) for k, v in values.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if nums:
                self.mlflow.log_metrics(nums, step=step)

    def plot(self) -> Path | None:
        if not self.enabled:
            return None
        return plot_losses(self.dir / METRICS, self.dir / PLOT)

    def close(self) -> None:
        if not self.enabled or self.file.closed:
            return
        self.file.close()
        if self.mlflow is not None:
            if (self.dir / PLOT).is_file():
                self.mlflow.log_artifact(str(self.dir / PLOT))
            self.mlflow.end_run()


def _start_mlflow(run_dir: Path, params: dict, resumed: bool):
    try:
        import mlflow
    except ImportError as e:
        raise NimaError("MLflow tracking was asked for (mlflow = true) but mlflow is not installed",
                        "pip install 'nima-edge[mlflow]' (or set mlflow = false)") from e
    # MLflow 3 keeps its file store in maintenance mode; SQLite is its recommended local store.
    mlflow.set_tracking_uri(f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}")
    if mlflow.get_experiment_by_name("nima-edge") is None:
        mlflow.create_experiment("nima-edge", artifact_location=(run_dir / MLFLOW_ARTIFACTS).resolve().as_uri())
    mlflow.set_experiment("nima-edge")
    id_file = run_dir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
    run = mlflow.start_run(run_id=run_id, run_name=run_dir.name)
    id_file.write_text(run.info.run_id)
    if run_id is None:
        mlflow.log_params({k: v for k, v in params.items() if v is not None})
    return mlflow


def read_metrics(path: Path) -> list[dict]:
    """The log's records, the latest per (event, step): a resumed run's repeats replace the lost ones."""
    latest: dict[tuple[str, int], dict] = {}
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            latest[(rec["event"], rec["step"])] = rec
    return sorted(latest.values(), key=lambda r: (r["step"], r["event"]))


def plot_losses(metrics: Path, out: Path) -> Path:
    from nima_edge.errors import require
    require("matplotlib", "train", "the loss plot (loss.png)").use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for event, key, label, style in (("train", "loss", "train loss", "-"), ("eval", "loss", "val loss", "o-"),
                                     ("eval", "window_loss", "val loss at the short training window", "s--")):
        pts = [(r["step"], r[key]) for r in recs if r["event"] == event and key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=label, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
