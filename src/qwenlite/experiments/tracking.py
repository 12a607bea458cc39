"""Optional experiment tracking: a finished experiment's curve and scores to Weights & Biases or
TensorBoard, when the user asks for it (``sweep run --track wandb|tensorboard``) and the library
is installed. Nothing else depends on it; the sweep directory is the record."""

from __future__ import annotations

from pathlib import Path

from qwenlite.errors import QwenliteError
from qwenlite.io import read_records

TRACKERS = ("wandb", "tensorboard")


def check_tracker(name: str) -> None:
    """One line if the tracker asked for is not installed (checked before anything runs)."""
    module = {"wandb": "wandb", "tensorboard": "torch.utils.tensorboard"}[name]
    try:
        __import__(module)
    except ImportError:
        raise QwenliteError(f"--track {name} needs the {name} package: pip install "
                            f"{name}") from None


def _records(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    return read_records(metrics)


def _finals(result: dict) -> dict[str, float]:
    out = {f"val/{k}": v for k, v in result["val"].items()}
    out.update({f"test/{k}": v for k, v in result.get("test", {}).items()})
    return out


def track(name: str, experiment: str, result: dict, metrics: Path) -> None:
    """Send the training records (loss, validation loss by step) and the final scores."""
    records = _records(metrics)
    if name == "wandb":
        import wandb

        run = wandb.init(project="qwenlite", name=experiment, config=result["settings"],
                         reinit=True)
        for r in records:
            run.log({k: v for k, v in r.items() if k in ("loss", "val_loss")}, step=r["step"])
        run.summary.update(_finals(result))
        run.finish()
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(metrics.parent.parent / "tensorboard"))
    for r in records:
        for key in ("loss", "val_loss"):
            if key in r:
                writer.add_scalar(f"{experiment}/{key}", r[key], r["step"])
    for key, value in _finals(result).items():
        writer.add_scalar(f"{experiment}/{key}", value, 0)
    writer.close()
