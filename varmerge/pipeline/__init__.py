"""The steps of a front estimation, as plain functions of a run plan (no orchestration here):

1. :mod:`~varmerge.pipeline.data` — :func:`prepare_tasks`: the offline data split into tasks;
2. :mod:`~varmerge.pipeline.theta0` — :func:`theta0`: the shared starting point and its prior;
3. :mod:`~varmerge.pipeline.finetunes` — :func:`finetune_task`: one task's posterior (by the
   posterior method's registered fit), :func:`learning_scores` (did each finetune learn: the
   gate before the sweeps) and :func:`multitask_finetune` at a chosen α;
4. :mod:`~varmerge.pipeline.sweeps` — :func:`sweep_and_score`: every merged model on the α grid,
   scored per task;
5. :mod:`~varmerge.pipeline.selection` — :func:`select`: the chosen α.

:mod:`varmerge.sequence` runs them in order (in process, or as Prefect tasks over the run store
of ``tasks/``). The names here are the package's interface: callers use ``pipeline.<name>``.
"""

from varmerge.pipeline.data import (
    TaskData,
    load_dataset,
    model_path,
    prepare_pretrain,
    prepare_tasks,
    pretrain_source,
    tasks_from_tensors,
    tasks_to_tensors,
)
from varmerge.pipeline.finetunes import check_accelerator, finetune_task, learning_scores, multitask_finetune
from varmerge.pipeline.selection import constraints, pooled_scores, select
from varmerge.pipeline.sweeps import (
    SWEEP_BLOCK,
    calibration_grams,
    map_sweep,
    merge_sweep,
    score_sweep,
    sweep_and_score,
    sweep_block_size,
    sweep_device,
)
from varmerge.pipeline.theta0 import (
    build_architecture,
    carried_hessian,
    has_prior,
    initial_model,
    model_options,
    seeded_model,
    theta0,
)

__all__ = [
    "SWEEP_BLOCK",
    "TaskData",
    "build_architecture",
    "calibration_grams",
    "carried_hessian",
    "check_accelerator",
    "constraints",
    "finetune_task",
    "has_prior",
    "initial_model",
    "learning_scores",
    "load_dataset",
    "map_sweep",
    "merge_sweep",
    "model_options",
    "model_path",
    "multitask_finetune",
    "pooled_scores",
    "prepare_pretrain",
    "prepare_tasks",
    "pretrain_source",
    "score_sweep",
    "seeded_model",
    "select",
    "sweep_and_score",
    "sweep_block_size",
    "sweep_device",
    "tasks_from_tensors",
    "tasks_to_tensors",
    "theta0",
]
