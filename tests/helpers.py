"""Shared test helpers: configs and random models (import as ``from helpers import ...``)."""

import torch

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
    "merge": {"methods": ["simple", "hessian", "mixture"], "spacing": 0.25, "options": {"mixture": {"iterations": 5}}},
    "selection": {"strategy": "top_k", "top_k": 1, "method": "mixture"},
    "multitask_steps": 25,
}

# TINY with a few more steps: each IVON run takes a few seconds, a window to kill a flow in.
RESUME = {**TINY, "name": "resume", "posterior": {**TINY["posterior"], "steps": 300}, "multitask_steps": 100}


def random_models(T, seed=0, dtype=torch.float64, shapes=None):
    """T state dicts with random means and positive precisions (a test helper)."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"layer.weight": (4, 3), "layer.bias": (4,), "head": (5,)}
    means = [{k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()} for _ in range(T)]
    precs = [{k: torch.rand(s, generator=g, dtype=dtype) * 3 + 0.05 for k, s in shapes.items()} for _ in range(T)]
    return means, precs


def plan_of(raw: dict, output_dir, **where):
    """The run plan of a raw config under ``output_dir`` (the run folder is ``output_dir/<name>``)."""
    from varmerge.config import parse_config
    from varmerge.plan import make_plan

    return make_plan(parse_config(raw), output_dir=output_dir, **where)


def checked_plan_of(raw: dict, output_dir):
    """The plan as a run gets it: checked by preflight, which tells it the tasks' sizes (the
    default α, rows of the α grid, need them)."""
    from varmerge.config import parse_config
    from varmerge.preflight import preflight

    return preflight(parse_config(raw), output_dir=output_dir)


def small_bert(folder):
    """A user's own model folder: a small BERT (one layer, width 32) with MiniLM's tokenizer,
    saved as ``save_pretrained`` saves any Hugging Face model."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from varmerge import models

    tokenizer = AutoTokenizer.from_pretrained(models.text_encoder_path())
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder
