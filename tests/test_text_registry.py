"""Text (LoRA) models go to the MLflow registry as a pyfunc logged as code that stands alone:
loaded back from its registry URI in a fresh process, with the backbone folder the model was
built from moved away and without varmerge or peft imported, it predicts the user's label names
with the probabilities the model it was logged from gives. (A flow run that registers one:
``tests/test_own_data.py``.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import small_bert

pytest.importorskip("peft")

TEXTS = ["the flight was late again and nobody helped", "best festival ever, great music", "ok"]
LABELS = ["negative", "neutral", "positive"]


@pytest.mark.slow
def test_a_registered_text_model_stands_alone_in_a_fresh_process(tmp_path):
    import mlflow

    from flows.front import log_text_model
    from varmerge import models

    backbone = small_bert(tmp_path / "my-bert")
    model = models.text_classifier(len(LABELS), backbone, "lora", r=2, alpha=4, target_modules=["query", "value"])
    with torch.no_grad():  # weights unlike a fresh init, so a load that dropped them would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    tokenizer = models.text_tokenizer(backbone)
    want = models.predict_texts(model, TEXTS, tokenizer, max_length=24)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("t")
    with mlflow.start_run():
        info = log_text_model(model, tokenizer, LABELS, 24, TEXTS[:2])
    version = mlflow.register_model(info.model_uri, "text-model")
    backbone.rename(tmp_path / "moved-away")  # the model carries what it needs

    probe = (
        "import json, sys, mlflow; "
        f"mlflow.set_tracking_uri({uri!r}); "
        f"m = mlflow.pyfunc.load_model('models:/text-model/{version.version}'); "
        f"rows = m.predict({TEXTS!r}); "
        "print(json.dumps([r if isinstance(r, dict) else r.model_dump() for r in rows])); "
        "print(json.dumps(sorted(k for k in ('varmerge', 'peft') if k in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows, imported = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert imported == []  # neither varmerge nor peft: torch and transformers only
    assert [r["label"] for r in rows] == [LABELS[i] for i in want.argmax(1).tolist()]
    got = torch.tensor([[r["probabilities"][n] for n in LABELS] for r in rows])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    # what it is made of: its code, a plain Hugging Face folder, pinned requirements; no pickle
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "text_model.py" in files and any(f.endswith(models.EXPORT_SETTINGS) for f in files), files
    assert any(f.endswith("model.safetensors") for f in files) and any(f.endswith("tokenizer.json") for f in files)
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))], files
    requirements = (local / "requirements.txt").read_text()
    assert "varmerge" not in requirements and "transformers==" in requirements and "torch==" in requirements
    example = json.loads((local / "input_example.json").read_text())
    assert TEXTS[0] in json.dumps(example)
