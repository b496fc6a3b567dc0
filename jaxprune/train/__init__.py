"""Training on partitioned pytrees (trainable / frozen / masks), one module per job:

* ``loss``: the objective (CE or distillation from the unpruned model), the micro-batch mean
* ``optim``: AdamW + warm-up/cosine schedule + clipping
* ``step``: the jitted train step (``GradHook`` inside) and eval step, ``TrainState`` and its placement
* ``checkpoints``: orbax checkpoints of the ``TrainState``, resume from the newest readable one
* ``signals``: SIGTERM / SIGINT → checkpoint, ``Preempted``; elsewhere ``StoppedEarly``; ``PREEMPTED_EXIT``
* ``loop``: the loop (metrics.jsonl, validation perplexity, checkpoints, NaN guard)
* ``plots``: loss.png
"""

from .checkpoints import TrainCheckpoints, leaves_dict, restore_latest
from .loop import LoopCallbacks, LoopConfig, train_loop, validation_ppl
from .loss import DistillConfig, distillation_loss, make_loss_fn, mean_over_microbatches
from .optim import OptimConfig, lr_schedule, make_optimizer
from .plots import plot_metrics
from .signals import PREEMPTED_EXIT, CommandSignals, Preempted, StopSignals, StoppedEarly
from .step import GradHook, TrainState, make_eval_step, make_train_step, place_train_state, state_shardings_of

__all__ = [
    "DistillConfig", "GradHook", "LoopCallbacks", "LoopConfig", "OptimConfig", "PREEMPTED_EXIT", "Preempted", "CommandSignals", "StoppedEarly",
    "StopSignals", "TrainCheckpoints", "TrainState", "distillation_loss", "leaves_dict", "lr_schedule",
    "make_eval_step", "make_loss_fn", "make_optimizer", "make_train_step", "mean_over_microbatches",
    "place_train_state", "plot_metrics", "restore_latest", "state_shardings_of", "train_loop", "validation_ppl",
]
