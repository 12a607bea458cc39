"""FLOPS of a forward pass, a training step and a generation, by the coursework's rules.

The counts come from the ``flops()`` methods beside every module's ``forward()``
(:mod:`qwenlite.model`, :mod:`qwenlite.training.lora`), so they follow the model's real shapes; this module
adds up a batch, applies the training rule and renders tables. ``docs/flops.md`` explains the
accounting operation by operation.

Rules (coursework section 1 and question 2c): an (m×n)(n×p) matmul costs m·p·(2n−1);
add/sub/neg/mul/div/inverse 1; exp/log and sin/cos/sqrt 10; tokenization and the computation of
the rotary cos/sin tables are free, applying the rotation is counted; GQA's attention is counted
as standard multi-head attention; a training step costs **3 × forward** (backward = 2 × forward).
That rule is the budget figure. :func:`train_step_flops` also gives, clearly apart, the FLOPS an
implementation with frozen base weights actually executes (the *executed* side figure).

Command line::

    python -m qwenlite.flops --breakdown [--preset qwen2.5-0.5b | --weights DIR] [--seq-len 512]
        [--batch 1] [--train] [--lora-rank R] [--generate N [--head-rows K]] [--gqa-as-mha]
        [--json]
"""

from qwenlite.flops.cli import build_parser, main, report
from qwenlite.flops.counts import (
                                   MATMUL_PARTS,
                                   TRAIN_FACTOR,
                                   counting_model,
                                   forward_flops,
                                   generation_flops,
)
from qwenlite.flops.executed import (
                                   MatmulTrace,
                                   TrainingTrace,
                                   TrainStepFlops,
                                   executed_flops,
                                   meta_twin,
                                   trace_training_step,
                                   train_step_flops,
)
from qwenlite.flops.tables import breakdown_table, component, summarize

__all__ = [
    "MATMUL_PARTS", "TRAIN_FACTOR", "MatmulTrace", "TrainStepFlops", "TrainingTrace",
    "breakdown_table", "build_parser", "component", "counting_model", "executed_flops",
    "forward_flops", "generation_flops", "main", "meta_twin", "report", "summarize",
    "trace_training_step", "train_step_flops",
]
