"""The registry entry of a text classifier: an MLflow pyfunc logged as code, not pickled, that
stands alone.

``flows.front`` logs this file as the model's code (MLflow's models-from-code) and, as the
artifact ``classifier``, a plain Hugging Face folder (:func:`varmerge.models.export_text_classifier`:
the weights with LoRA merged in, the config with the user's label names, the tokenizer). Loading
it (``mlflow.pyfunc.load_model("models:/<name>/<version>")``) needs torch and transformers only:
not varmerge, not peft, not the backbone folder the run started from. ``predict`` takes a list of
texts and returns, per text, the predicted ``label`` (a label name) and ``probabilities`` keyed by
label name.

Self-contained on purpose: this file is the model's whole code (nothing of varmerge is imported).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel
from pydantic import BaseModel


class Prediction(BaseModel):
    """One text's answer: the most probable label and every label's probability."""

    label: str
    probabilities: dict[str, float]


class TextClassifier(PythonModel):
    """A varmerge text classifier behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = context.artifacts["classifier"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True).eval()
        config = self.model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.max_length = json.loads((Path(folder) / "varmerge.json").read_text())["max_length"]

    def predict(self, context, model_input: list[str], params=None) -> list[Prediction]:
        import torch

        texts = list(model_input)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            p = torch.softmax(self.model(**enc).logits.float(), dim=-1)
        return [
            Prediction(label=self.labels[int(row.argmax())], probabilities=dict(zip(self.labels, row.tolist())))
            for row in p
        ]


mlflow.models.set_model(TextClassifier())
