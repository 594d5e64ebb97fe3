"""The registry entry of a text (LoRA) model: an MLflow pyfunc logged as code, not pickled.

``flows.front`` logs this file as the model's code (MLflow's models-from-code), the multitask
weights as a safetensors artifact and the experiment config as the model config. Loading
it (``mlflow.pyfunc.load_model("models:/<name>/<version>")``) rebuilds the configured model (its
backbone folder: ``model.options.model_path`` or the offline MiniLM), loads the weights and
tokenizer, and ``predict`` takes a list of texts and returns, per text, the predicted ``label``
and each class's probability (``p0``, ``p1``, ...).
"""

from __future__ import annotations

import json

import mlflow
from mlflow.pyfunc import PythonModel


class TextClassifier(PythonModel):
    """A varmerge text classifier behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        from varmerge import models, pipeline
        from varmerge.config import parse_config

        settings = context.model_config
        self.cfg = parse_config(json.loads(settings["config"]))
        self.model = pipeline.seeded_model(self.cfg, int(settings["num_classes"]))
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()
        self.tokenizer = models.text_tokenizer(pipeline.model_path(self.cfg))

    def predict(self, context, model_input: list[str], params=None) -> list[dict[str, float]]:
        from varmerge import models

        p = models.predict_texts(self.model, list(model_input), self.tokenizer, max_length=self.cfg.data.max_length)
        return [{"label": int(row.argmax()), **{f"p{c}": float(v) for c, v in enumerate(row)}} for row in p]


mlflow.models.set_model(TextClassifier())
