"""Shared test fixtures data."""

TINY = {
    "name": "tiny",
    "data": {
        "source": "mnist5k",
        "max_train_per_task": 300,
        "tasks": [
            {"name": "a", "classes": [0, 1]},
            {"name": "b", "classes": [2, 3, 4]},
            {"name": "c", "classes": [5, 6, 7, 8, 9]},
        ],
    },
    "model": {"name": "logreg"},
    "posterior": {"method": "multi_ivon", "components": 2, "steps": 25, "batch_size": 64, "lr": 0.1},
    "merge": {"methods": ["simple", "hessian", "mixture"], "spacing": 0.25, "mixture_iterations": 5},
    "selection": {"top_k": 1, "method": "mixture"},
    "multitask_steps": 25,
}

# TINY with a few more steps: each IVON run takes a few seconds, a window to kill a flow in.
RESUME = {
    **TINY,
    "name": "resume",
    "posterior": {**TINY["posterior"], "steps": 300},
    "multitask_steps": 100,
}
