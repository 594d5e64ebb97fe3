"""Text (LoRA) models go to the MLflow registry as a pyfunc logged as code: loaded back from its
registry URI, it predicts what the model it was logged from predicts. (A flow run that registers
one: ``tests/test_own_data.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")


@pytest.mark.slow
def test_a_registered_text_model_loads_from_the_registry_and_predicts(tmp_path):
    import mlflow
    from safetensors.torch import save_file

    from flows.front import log_text_model
    from varmerge import models, pipeline
    from varmerge.config import parse_config

    cfg = parse_config(
        {
            "name": "text-registry",
            "data": {
                "source": "tweets",
                "options": {"domains": ["airline", "coachella"]},
                "max_length": 24,
                "tasks": [{"name": "airline", "domain": "airline"}, {"name": "coachella", "domain": "coachella"}],
            },
            "model": {"name": "lora_text", "options": {"r": 2, "alpha": 4}},
            "merge": {"methods": ["simple"]},
        }
    )
    model = pipeline.seeded_model(cfg, 3)
    with torch.no_grad():  # weights unlike a fresh init, so a load that dropped them would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    weights = tmp_path / "multitask.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    texts = ["the flight was late again and nobody helped", "best festival ever, great music", "ok"]
    want = models.predict_texts(model, texts, models.text_tokenizer(), max_length=24)

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("t")
    with mlflow.start_run():
        info = log_text_model(json.dumps(cfg.model_dump(mode="json")), 3, weights, texts[0])
    version = mlflow.register_model(info.model_uri, "text-model")
    loaded = mlflow.pyfunc.load_model(f"models:/text-model/{version.version}")
    got = loaded.predict(texts)
    assert [sorted(row) for row in got] == [["label", "p0", "p1", "p2"]] * 3
    probs = torch.tensor([[row[f"p{c}"] for c in range(3)] for row in got])
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=0)
    assert [row["label"] for row in got] == want.argmax(1).tolist()
    # no pickle: the model is its code, a safetensors file and the config
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "text_model.py" in files and any(f.endswith("multitask.safetensors") for f in files), files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))], files
