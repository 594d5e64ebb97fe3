"""The merge registry: every method's declared needs and options, config-time option checks,
generic dispatch over diagonal / mixture / full posteriors, and no merging -> facade import."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import random_models
from pydantic import ValidationError

from varmerge import merge, pipeline
from varmerge.config import ConfigError, parse_config
from varmerge.merging import registry
from varmerge.merging.registry import CalibrationOptions, Options
from varmerge.posterior import DiagonalGaussian, FullGaussian, MixtureGaussian

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())


def cfg(posterior="multi_ivon", methods=None, options=None, **merge_extra):
    d = yaml.safe_load(yaml.safe_dump(SMOKE))
    d["posterior"]["method"] = posterior
    if methods is not None:
        d["merge"]["methods"] = methods
        d["selection"]["method"] = methods[-1]
    if options is not None:
        d["merge"]["options"] = options
    d["merge"].update(merge_extra)
    return parse_config(d, "test.yaml")


# ------------------------------------------------------------------------------------ the specs
@pytest.mark.parametrize("name", registry.names())
def test_every_method_declares_its_kind_and_an_options_model(name):
    spec = registry.get_method(name)
    assert spec.name == name and spec.posterior in registry.POSTERIOR_KINDS
    assert spec.kind in registry.METHOD_KINDS and spec.description
    assert issubclass(spec.options, Options)
    assert spec.options.model_config["extra"] == "forbid" and spec.options.model_config["frozen"]
    defaults = spec.options()  # every option has a default
    with pytest.raises(ValidationError):  # frozen
        defaults.__setattr__(next(iter(spec.options.model_fields), "x"), 1)
    assert spec.needs_calibration == issubclass(spec.options, CalibrationOptions)
    params = inspect.signature(spec.fn).parameters
    if spec.options.bundled:  # the function takes the model itself, None meaning its defaults
        assert defaults.rule_kwargs() == {"options": defaults}
        assert params["options"].default is None, f"{name}: options=None must mean the defaults"
        assert spec.options.__name__ in str(params["options"].annotation), f"{name}: options is not annotated"
        assert not set(spec.options.model_fields) & set(params), f"{name}: a setting is also a keyword argument"
        return
    # the model mirrors the function: each setting is one of its keyword arguments, same default
    for key, value in defaults.rule_kwargs().items():
        assert key in params, f"{name}: option {key!r} is not an argument of {spec.fn.__name__}"
        assert params[key].default == value, f"{name}.{key}: default {value!r} != {params[key].default!r}"


def test_declared_needs():
    kinds = {n: registry.get_method(n).posterior for n in registry.names()}
    assert kinds["hessian"] == "diagonal" and kinds["mixture"] == "mixture" and kinds["hessian_full"] == "full"
    assert kinds["simple"] == kinds["ties"] == kinds["regmean"] == "none"
    assert registry.get_method("map").kind == "estimator" and registry.names("estimator") == ["map"]
    assert registry.get_method("hessian_full").dtype == torch.float32
    assert "map" not in merge.merge_names() and "map" in merge.merge_names(None)
    assert merge.MERGE_METHODS is registry.all_methods()
    with pytest.raises(ValueError, match="already registered"):
        registry.register("simple")(lambda means, alpha: None)
    with pytest.raises(ValueError, match="posterior must be one of"):
        registry.register("new", posterior="dense")


def test_register_refuses_loose_options_models():
    from pydantic import ConfigDict

    class Loose(Options):
        model_config = ConfigDict(extra="allow", frozen=True)

    class Required(Options):
        x: int

    with pytest.raises(ValueError, match="extra='forbid'"):
        registry.register("loose", options=Loose)
    with pytest.raises(ValueError, match="requires \\['x'\\]"):
        registry.register("required", options=Required)
    with pytest.raises(ValueError, match="CalibrationOptions"):
        registry.register("calib", needs_calibration=True)
    assert "loose" not in registry.names()


# ------------------------------------------------------------------------ config-time checks
@pytest.mark.parametrize(
    "options, match",
    [
        ({"hessian": {"floor": 1.0}}, "options.hessian: unknown option 'floor'; hessian takes"),
        ({"mixture": {"iterations": 2.5}}, "options.mixture.iterations: Input should be a valid integer"),
        ({"mixture": {"iterations": -1}}, "merge.options.mixture: iterations must be a non-negative integer"),
        ({"hessian_full": {"max_batch_bytes": "lots"}}, "options.hessian_full.max_batch_bytes: Input should be"),
        ({"task_arithmetic": {"scale": float("nan")}}, "merge.options.task_arithmetic: task arithmetic scale"),
        ({"regmean": {"calibration_examples": True}}, "options.regmean.calibration_examples: Input should be"),
        ({"simple": {"chunk_elems": 0}}, "merge.options.simple: chunk_elems must be >= 1"),
        ({"map": {"pop_size": 1}}, "merge.options.map: MAP pop_size must be an integer >= 2"),
        ({"ties": "dense"}, "merge.options.ties: Input should be a valid dictionary"),
    ],
)
def test_bad_option_names_and_values_fail_at_config_time(options, match):
    with pytest.raises(ConfigError, match=match) as err:
        cfg(options=options)
    assert "\n" not in str(err.value)


def test_good_options_of_every_kind_validate():
    c = cfg(
        options={
            "mixture": {"iterations": 3, "tol": 1e-6},
            "hessian": {"precision_floor": 1e-8},
            "hessian_full": {"max_batch_bytes": 1 << 20},
            "task_arithmetic": {"scale": 2},
            "regmean": {"calibration_examples": 8, "ridge": 0.01},
            "map": {"n_evaluations": 9},
        }
    )
    assert c.merge.options["task_arithmetic"] == {"scale": 2}
    parsed = registry.get_method("task_arithmetic").parse_options(c.merge.options["task_arithmetic"])
    assert parsed.scale == 2.0 and isinstance(parsed.scale, float)
    assert "calibration_examples" not in registry.get_method("regmean").parse_options({}).rule_kwargs()


@pytest.mark.parametrize(
    "key, new",
    [
        ("mixture_iterations", "merge.options.mixture.iterations"),
        ("task_arithmetic_scale", "merge.options.task_arithmetic.scale"),
    ],
)
def test_moved_merge_fields_name_their_new_place(key, new):
    with pytest.raises(ConfigError, match=f"merge.{key} is now {new}"):
        cfg(**{key: 5})


@pytest.mark.parametrize(
    "posterior, methods, match",
    [
        ("ivon", ["simple", "mixture"], "'mixture' needs a mixture posterior .* multi_ivon or soup_ivon"),
        ("full_von", ["mixture"], "'mixture' needs a mixture posterior but posterior.method 'full_von' gives a full"),
        ("multi_ivon", ["hessian_full"], "'hessian_full' needs a full posterior .* set posterior.method to full_von"),
        ("adamw_sg", ["hessian_full"], "'hessian_full' needs a full posterior"),
    ],
)
def test_posterior_method_must_give_the_kind_each_rule_reads(posterior, methods, match):
    with pytest.raises(ConfigError, match=match):
        cfg(posterior, methods)


@pytest.mark.parametrize(
    "posterior, methods",
    [
        ("full_von", ["simple", "hessian", "hessian_full", "ties", "map"]),
        ("soup_ivon", ["hessian", "mixture"]),
        ("ivon", ["simple", "task_arithmetic", "hessian", "regmean", "map"]),
    ],
)
def test_posterior_kinds_that_serve(posterior, methods):
    d = yaml.safe_load(yaml.safe_dump(SMOKE))
    d["posterior"] = {"method": posterior, **({"checkpoint_steps": [10]} if posterior == "soup_ivon" else {})}
    d["merge"]["methods"], d["selection"]["method"] = methods, methods[-1]
    assert parse_config(d, "test.yaml").merge.methods == methods


# ----------------------------------------------------------------------------------- dispatch
def diagonals(T=3, seed=0, dtype=F64):
    means, precs = random_models(T, seed=seed, dtype=dtype)
    return [DiagonalGaussian(m, p) for m, p in zip(means, precs)]


def mixtures(T=3, K=2, seed=0):
    return [MixtureGaussian(diagonals(K, seed=seed + 10 * t)) for t in range(T)]


def fulls(T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (2, 3), "b": (2,)}
    out = []
    for _ in range(T):
        a = torch.randn(8, 8, generator=g, dtype=F64)
        out.append(FullGaussian(torch.randn(8, generator=g, dtype=F64), a @ a.T + torch.eye(8, dtype=F64), shapes))
    return out


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


ALPHA = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=F64)


def test_dispatch_of_diagonal_posteriors_equals_the_rules():
    posts = diagonals()
    base = {k: torch.zeros_like(v) for k, v in posts[0].mean.items()}
    means, precs = [p.mean for p in posts], [p.precision for p in posts]
    grams = [{"layer.weight": torch.eye(3, dtype=F64) * (t + 1)} for t in range(3)]
    cases = {
        "simple": ({}, lambda: merge.simple_average(means, ALPHA)),
        "task_arithmetic": ({"scale": 0.5}, lambda: merge.task_arithmetic(base, means, ALPHA, scale=0.5)),
        "hessian": ({"precision_floor": 0.1}, lambda: merge.hessian_weighted(means, precs, ALPHA, precision_floor=0.1)),
        "ties": ({"density": 0.5}, lambda: merge.ties(base, means, ALPHA, density=0.5)),
        "dare": ({"drop": 0.3, "seed": 4}, lambda: merge.dare(base, means, ALPHA, drop=0.3, seed=4)),
        "slerp": ({}, lambda: merge.slerp(base, means, ALPHA)),
        "model_soup": ({}, lambda: merge.model_soup(means, ALPHA)),
        "esm": ({"rank": 1}, lambda: merge.esm(base, means, ALPHA, rank=1)),
        "regmean": (
            {"ridge": 0.01, "calibration_examples": 7},
            lambda: merge.regmean(means, ALPHA, grams=grams, ridge=0.01),
        ),
    }
    assert set(cases) | {"mixture", "hessian_full", "mixture_full"} == set(merge.merge_names())
    for name, (opts, direct) in cases.items():
        assert_same(merge.apply(name, posts, base, ALPHA, opts, grams=grams), direct())
        # the pipeline's merge_sweep is the same generic call (options as a dict or a parsed model)
        parsed = registry.get_method(name).parse_options(opts)
        assert_same(pipeline.merge_sweep(name, posts, base, ALPHA, options=parsed, grams=grams), direct())


def test_dispatch_of_mixture_posteriors_equals_the_rules():
    posts = mixtures()
    means, precs = [p.means for p in posts], [p.precisions for p in posts]
    got = merge.apply("mixture", posts, None, ALPHA, {"iterations": 3})
    assert_same(got, merge.mixture_weighted(means, precs, ALPHA, options=merge.MixtureOptions(iterations=3)))
    assert_same(merge.apply("mixture", posts, None, ALPHA), merge.mixture_weighted(means, precs, ALPHA))
    # non-mixture rules read each task's first component
    first_m, first_p = [p.components[0].mean for p in posts], [p.components[0].precision for p in posts]
    assert_same(merge.apply("hessian", posts, None, ALPHA), merge.hessian_weighted(first_m, first_p, ALPHA))
    assert_same(merge.apply("simple", posts, None, ALPHA), merge.simple_average(first_m, ALPHA))
    # the mixture's weights reach the rule
    weighted = [MixtureGaussian(p.components, weights=[0.9, 0.1]) for p in posts]
    want = merge.mixture_weighted(means, precs, ALPHA, weights=[[0.9, 0.1]] * 3)
    assert_same(merge.apply("mixture", weighted, None, ALPHA), want)
    # a single diagonal Gaussian is a K = 1 mixture
    diag = diagonals()
    assert_same(
        merge.apply("mixture", diag, None, ALPHA),
        merge.mixture_weighted([[d.mean] for d in diag], [[d.precision] for d in diag], ALPHA),
    )


def test_dispatch_of_full_posteriors_equals_the_rules():
    posts = fulls()
    got = merge.apply("hessian_full", posts, None, ALPHA, {"max_batch_bytes": 512})
    flat = merge.hessian_weighted_full([p.mean.float() for p in posts], [p.precision.float() for p in posts], ALPHA)
    assert_same(got, posts[0].state_dict(flat))
    assert got["w"].shape == (3, 2, 3) and got["w"].dtype == torch.float32
    # one row gives one unbatched state dict
    one = merge.apply("hessian_full", posts, None, ALPHA[0])
    torch.testing.assert_close(one["b"], got["b"][0])
    # diagonal rules read the precisions' diagonals
    d = [p.diagonal() for p in posts]
    assert_same(
        merge.apply("hessian", posts, None, ALPHA),
        merge.hessian_weighted([x.mean for x in d], [x.precision for x in d], ALPHA),
    )


def test_dispatch_errors_name_the_method():
    posts = diagonals()
    with pytest.raises(ValueError, match=r"hessian_full needs full-Gaussian posteriors \(posterior.method: full_von\)"):
        merge.apply("hessian_full", posts, None, ALPHA)
    with pytest.raises(ValueError, match="hessian_full needs full-Gaussian"):
        merge.apply("hessian_full", mixtures(), None, ALPHA)
    with pytest.raises(ValueError, match="options.ties: unknown option 'densty'; ties takes"):
        merge.apply("ties", posts, {k: v * 0 for k, v in posts[0].mean.items()}, ALPHA, {"densty": 0.1})
    with pytest.raises(ValueError, match="'task_arithmetic' needs θ0"):
        merge.apply("task_arithmetic", posts, None, ALPHA)
    with pytest.raises(ValueError, match="'regmean' needs calibration Grams"):
        merge.apply("regmean", posts, None, ALPHA)
    with pytest.raises(ValueError, match="'map' is a front estimator, not a merge rule"):
        merge.apply("map", posts, None, ALPHA)
    with pytest.raises(ValueError, match="posteriors\\[0\\] is a dict, not a posterior"):
        merge.apply("simple", [p.mean for p in posts], None, ALPHA)
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        merge.apply("nope", posts, None, ALPHA)


def test_posterior_views():
    d = diagonals(1)[0]
    m = mixtures(1)[0]
    f = fulls(1)[0]
    assert d.as_kind("diagonal") is d and d.as_kind("none") is d and d.mixture().components[0] is d
    assert m.as_kind("diagonal") is m.components[0] and m.as_kind("mixture") is m
    assert f.as_kind("full") is f and f.mixture().K == 1
    torch.testing.assert_close(f.as_kind("diagonal").precision["b"], torch.diagonal(f.precision)[6:])
    for p in (d, m):
        with pytest.raises(ValueError, match="needs full-Gaussian posteriors"):
            p.as_kind("full")
    with pytest.raises(ValueError, match="unknown posterior kind 'dense'"):
        d.as_kind("dense")


# ------------------------------------------------------------------------------ no import cycle
def test_merging_modules_do_not_import_the_facade():
    code = (
        "import sys\n"
        "import varmerge.merging.baselines, varmerge.merging.gaussian\n"
        "from varmerge.merging import registry\n"
        "names = registry.names()\n"
        "assert 'ties' in names and 'hessian' in names and 'map' in names, names\n"
        "from varmerge import config, posterior\n"
        "print('varmerge.merge' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
    for path in (ROOT / "varmerge" / "merging").glob("*.py"):
        text = path.read_text()
        assert "varmerge.merge " not in text and "from varmerge import merge" not in text, path


def test_every_posterior_method_is_one_registry_entry_the_config_and_plan_read():
    from helpers import TINY

    from varmerge import posterior_methods
    from varmerge.config import ConfigError, parse_config
    from varmerge.plan import make_plan
    from varmerge.posterior import EXACT_VIEWS
    from varmerge.train import OPTIMIZERS

    names = posterior_methods.names()
    assert names == ["adamw_sg", "ivon", "multi_ivon", "soup_ivon", "full_von", "mixture_full_von"]
    for name in names:
        spec = posterior_methods.get_method(name)
        assert spec.structure in EXACT_VIEWS and spec.optimizer in OPTIMIZERS, name
        assert spec.multitask_optimizer in ("adamw", "ivon") and callable(spec.fit), name
        assert spec.options.model_config["extra"] == "forbid" and spec.options.model_config["frozen"], name
    with pytest.raises(ConfigError, match=r"unknown posterior method 'laplace'; known: adamw_sg, ivon"):
        parse_config({**TINY, "posterior": {"method": "laplace"}})
    plan = make_plan(parse_config({**TINY, "posterior": {**TINY["posterior"], "components": 3}}))
    assert plan.posterior_options == posterior_methods.MultiIVONOptions(components=3)
    assert plan.finetune.optimizer.name == "ivon"
