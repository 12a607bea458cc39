"""``python -m qwenlite.train``: LoRA fine-tuning of Qwen2.5 on LLMTIME-encoded series.

Defaults are the coursework's: learning rate 1e-5, rank 4, context 512 tokens, batch 4, up to
10,000 optimizer steps. Everything a run needs to be reported or resumed goes into its run
directory:

* ``config.json`` (these settings), ``llmtime.json`` (the preprocessing settings and the α fitted
  on the training split), ``split.json`` (which systems are train/val/test);
* ``metrics.jsonl`` (a line per step: loss, FLOPS so far; and one per validation);
* ``adapter/`` (the latest LoRA adapter in PEFT's format) and ``state.pt`` (step, optimizer,
  adapter weights), written atomically; the one before is kept as ``state.prev.pt``.

Rerunning the same command on the same run directory resumes from the last checkpoint with the
same data order, so even a run killed with ``kill -9`` continues with an identical loss curve.
Every run's FLOPS go into the FLOPS ledger; a run whose plan does not fit in the budget is refused.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwenlite import rates
from qwenlite.errors import QwenliteError
from qwenlite.io import atomic_write_text
from qwenlite.training import metrics_log
from qwenlite.training.checkpoint import Origin, load_checkpoint, save_checkpoint
from qwenlite.training.ledger import Ledger, fmt_flops
from qwenlite.training.loss import linear_cross_entropy


@dataclass
class TrainConfig:
    """Settings of a training run (saved as ``config.json`` in the run directory)."""

    lr: float = 1e-5
    rank: int = 4  # 0: no LoRA (the logit bias alone trains)
    alpha: float | None = None  # None: equal to the rank (scaling 1)
    context: int = 512
    batch: int = 4
    max_steps: int = 10_000
    eval_interval: int = 500
    eval_windows: int = 64
    save_interval: int = 100
    seed: int = 0
    dtype: str = "fp32"
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    decimals: int = 2
    stride: int | None = None  # None: half the context
    weight_decay: float = 0.0
    logit_bias: bool = False  # the course's trainable LM-head bias
    experiment: str = ""
    weights: str = ""
    data: str = ""
    #: what the checkpoint and the data are, whatever their paths: a resumed run must match them
    weights_id: str = ""
    data_id: str = ""

    # Fields that may change when a run is resumed (they do not change its trajectory): the
    # paths too, which differ between machines (the ids are checked instead).
    RESUMABLE = ("max_steps", "eval_interval", "save_interval", "experiment", "weights", "data")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        raw = dict(raw)
        raw["targets"] = tuple(raw.get("targets", ()))
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


def window_stride(context: int, stride: int | None = None) -> int:
    """Tokens between the starts of training windows: ``stride``, else half the context."""
    return stride or max(context // 2, 1)


def n_validations(upto: int, max_steps: int, eval_interval: int) -> int:
    """Validations a run of ``max_steps`` has run by step ``upto``: before the first step (the
    untrained reference), at every multiple of ``eval_interval`` (0: none), and at the end."""
    n = 1 + (upto // eval_interval if eval_interval else 0)
    if upto and upto == max_steps and (not eval_interval or upto % eval_interval):
        n += 1
    return n


class Batches:
    """Deterministic batch order: a fresh seeded permutation of the windows every epoch, so the
    batch of any step can be recomputed from the step number alone (exact resumption)."""

    def __init__(self, n_windows: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n_windows, batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Window indices of optimizer step ``step`` (0-based)."""
        out = []
        for g in range(step * self.batch, (step + 1) * self.batch):
            out.append(self._perm(g // self.n)[g % self.n])
        return np.asarray(out)


def lm_loss(model, input_ids: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose target is not padding.

    input_ids, loss_mask: (batch, seq); the loss at position t predicts token t+1. The LM head
    and the loss are fused (:mod:`qwenlite.training.loss`): no (batch, seq, vocab) logits are kept.
    """
    h = model(input_ids, return_hidden=True)[:, :-1]
    targets = input_ids[:, 1:].reshape(-1)
    weights = None if loss_mask is None else loss_mask[:, 1:].reshape(-1).float()
    return linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, targets,
                                weights, bias=model.lm_head.bias)


class Trainer:
    """One LoRA training run in a run directory (fresh or resumed)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, device: torch.device,
                 ledger: Ledger, progress: bool = True):
        self.cfg, self.run_dir, self.device, self.ledger = cfg, run_dir, device, ledger
        self.progress = progress

    # ----- set-up -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Read and check everything the run needs (data, split, α, windows, model); writes
        nothing, so a run refused here leaves the run directory as it was (or absent)."""
        from qwenlite.accel import for_device
        from qwenlite.data import load_dataset, make_training_windows, split_systems
        from qwenlite.data.llmtime import LLMTimeSettings, encode, fit_alpha
        from qwenlite.data.tokenizer import Tokenizer
        from qwenlite.flops import forward_flops, train_step_flops
        from qwenlite.model.loading import load_model
        from qwenlite.training.lora import add_logit_bias, apply_lora

        cfg, run_dir = self.cfg, self.run_dir
        dataset = load_dataset(cfg.data)
        split_file = run_dir / "split.json"
        settings_file = run_dir / "llmtime.json"
        self.resumed = split_file.exists() and settings_file.exists()
        self.origin = Origin.load(run_dir)
        if self.resumed:  # reuse, never refit
            from qwenlite.data import Split

            split = Split.load(split_file)
            settings = LLMTimeSettings.load(settings_file)
        else:
            split = split_systems(len(dataset.trajectories), seed=cfg.seed)
            settings = fit_alpha(dataset.trajectories[split.train],
                                 LLMTimeSettings(decimals=cfg.decimals))
        self.settings, self.split = settings, split

        tok = Tokenizer(cfg.weights)
        stride = window_stride(cfg.context, cfg.stride)

        def windows(indices):
            seqs = tok.encode_batch([encode(dataset.trajectories[i], settings) for i in indices])
            return make_training_windows(seqs, cfg.context, stride)

        self.train_windows = windows(split.train)
        val = windows(split.val)
        gen = np.random.default_rng(cfg.seed)
        pick = gen.permutation(len(val.input_ids))[: cfg.eval_windows]
        self.val_ids = val.input_ids[pick]
        self.val_mask = None if val.loss_mask is None else val.loss_mask[pick]

        self.model = for_device(load_model(cfg.weights, dtype=torch.float32, device=self.device))
        torch.manual_seed(cfg.seed)  # LoRA A's initialisation: same seed, same run
        self.model.requires_grad_(False)
        if cfg.rank:
            apply_lora(self.model, cfg.rank, cfg.alpha, cfg.targets)
        if cfg.logit_bias:
            add_logit_bias(self.model)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.batches = Batches(len(self.train_windows.input_ids), cfg.batch, cfg.seed)
        self.step_flops = train_step_flops(self.model, cfg.context, cfg.batch).rule
        self.eval_flops = forward_flops(self.model, cfg.context, loss=True).total() * len(self.val_ids)
        self.tokens_per_step = cfg.context * cfg.batch

    def write_run_files(self) -> None:
        """Create the run directory with ``config.json``, and ``split.json`` and ``llmtime.json``
        for a new run: only once the run has been checked and its plan accepted."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.json", json.dumps(self.cfg.to_dict(), indent=2))
        if not self.resumed:
            self.split.save(self.run_dir / "split.json")
            self.settings.save(self.run_dir / "llmtime.json")

    def n_evals(self, upto: int) -> int:
        """Validations run by step ``upto`` (see :func:`n_validations`)."""
        return n_validations(upto, self.cfg.max_steps, self.cfg.eval_interval)

    def flops_at(self, step: int, evals: int) -> int:
        """FLOPS of the run's whole line by step ``step`` with ``evals`` validations: its
        origin's (a continued run's parent), then this directory's own steps and validations."""
        o = self.origin
        return o.flops + (step - o.step) * self.step_flops + (evals - o.evals) * self.eval_flops

    # ----- checkpoints ----------------------------------------------------------------------
    def load_state(self) -> tuple[int, int]:
        """Restore the newest readable checkpoint; returns (step, evals done)."""
        return load_checkpoint(self.run_dir, self.model, self.optimizer, self.device)

    def save_state(self, step: int, evals: int) -> None:
        """Checkpoint and adapter; the ledger charges what this run directory trained (a
        continued run: only the steps after its origin)."""
        from qwenlite.training.lora import save_adapter

        save_checkpoint(self.run_dir, self.model, self.optimizer, step, evals)
        save_adapter(self.model, self.run_dir / "adapter", self.cfg.weights)
        self._record(step, evals)

    def _record(self, step: int, evals: int) -> None:
        o = self.origin
        self.ledger.record(self.ledger_key, self.flops_at(step, evals) - o.flops, step - o.step,
                           (step - o.step) * self.tokens_per_step,
                           status="done" if step >= self.cfg.max_steps else "running")

    # ----- the loop -------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    @torch.no_grad()
    def validate(self) -> float:
        from tqdm import tqdm

        self.model.eval()
        total, weight = 0.0, 0.0
        starts = range(0, len(self.val_ids), self.cfg.batch)
        for i in tqdm(starts, desc="validation", unit="batch", leave=False,
                      disable=not self.progress, dynamic_ncols=True):
            ids = self.val_ids[i:i + self.cfg.batch].to(self.device)
            mask = None if self.val_mask is None else self.val_mask[i:i + self.cfg.batch].to(
                self.device)
            with self.autocast():
                loss = lm_loss(self.model, ids, mask)
            w = float(ids.shape[0] if mask is None else mask[:, 1:].sum())
            total += float(loss) * w
            weight += w
        self.model.train()
        return total / max(weight, 1.0)

    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        self.ledger_key = str(self.run_dir.resolve())
        self.prepare()
        start, evals = self.load_state()
        planned_evals = self.n_evals(cfg.max_steps) - evals
        planned = ((cfg.max_steps - start) * self.step_flops
                   + max(planned_evals, 0) * self.eval_flops)
        self.ledger.plan(self.ledger_key, cfg.experiment or self.run_dir.name, "train",
                         max(planned, 0), flops_per_step=self.step_flops,
                         run_dir=str(self.run_dir), rank=cfg.rank, lr=cfg.lr,
                         context=cfg.context, batch=cfg.batch)
        self.write_run_files()
        metrics_log.truncate(self.run_dir / "metrics.jsonl", start if evals else -1)
        gap = metrics_log.gap(self.run_dir / "metrics.jsonl", start)
        if gap:
            print(f"warning: {self.run_dir}/metrics.jsonl has no records for steps "
                  f"{gap[0]}..{gap[1]} though the checkpoint is at step {start}; training "
                  f"goes on from the checkpoint, the curve keeps the gap", file=sys.stderr)
        if start >= cfg.max_steps:
            self._record(start, evals)  # a kill after the last checkpoint, before its record
            print(f"{self.run_dir}: already trained for {start} steps (max {cfg.max_steps})")
            return {"step": start}
        print(f"training {self.run_dir}: steps {start}..{cfg.max_steps}, "
              f"{len(self.train_windows.input_ids)} windows of {cfg.context} tokens, "
              f"{fmt_flops(self.step_flops)} FLOPS/step (3x forward rule), "
              f"plan {fmt_flops(planned)} FLOPS", file=sys.stderr)
        print(rates.start_line(f"training to step {cfg.max_steps}", "train", planned,
                               self.ledger.budget, cfg.dtype, self.device,
                               self.model), file=sys.stderr)
        metrics = open(self.run_dir / "metrics.jsonl", "a")
        bar = tqdm(total=cfg.max_steps, initial=start, disable=not self.progress,
                   unit="step", dynamic_ncols=True)
        ids_all, mask_all = self.train_windows.input_ids, self.train_windows.loss_mask
        last_val = None
        t0 = time.perf_counter()
        if evals == 0:  # the untrained model's validation loss: the reference for the curve
            last_val = self.validate()
            evals = 1
            metrics.write(json.dumps({"step": 0, "val_loss": last_val, "tokens": 0,
                                      "flops": self.flops_at(0, evals)}) + "\n")
            metrics.flush()
        try:
            for step in range(start, cfg.max_steps):
                idx = torch.as_tensor(self.batches.indices(step))
                ids = ids_all[idx].to(self.device)
                mask = None if mask_all is None else mask_all[idx].to(self.device)
                with self.autocast():
                    loss = lm_loss(self.model, ids, mask)
                if not torch.isfinite(loss):
                    raise QwenliteError(f"loss is {float(loss)} at step {step + 1}; lower --lr "
                                        f"(now {cfg.lr})")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                done = step + 1
                loss = loss.item()
                record = {"step": done, "loss": loss, "lr": cfg.lr,
                          "tokens": done * self.tokens_per_step,
                          "flops": self.flops_at(done, evals),
                          "seconds": round(time.perf_counter() - t0, 3)}
                if (cfg.eval_interval and done % cfg.eval_interval == 0) or done == cfg.max_steps:
                    last_val = self.validate()
                    evals += 1
                    record.update(val_loss=last_val, flops=self.flops_at(done, evals))
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}",
                                val=f"{last_val:.4f}" if last_val is not None else "-",
                                flops=fmt_flops(record["flops"]))
                if done % cfg.save_interval == 0 or done == cfg.max_steps:
                    self.save_state(done, evals)
        finally:
            bar.close()
            metrics.close()
        rates.record("train", cfg.dtype, self.device, self.model, planned, time.perf_counter() - t0)
        return {"step": cfg.max_steps, "val_loss": last_val,
                "flops": self.flops_at(cfg.max_steps, evals)}
