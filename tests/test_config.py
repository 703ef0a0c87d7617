"""config.yaml: schema validation with clear errors, and the checks beyond it."""

import copy

import pytest
import yaml

from pipeline.config import ConfigError, check_config, load_config, validate_schema

from .conftest import REPO

BASE = yaml.safe_load((REPO / "config.yaml").read_text())


def validated(mutate):
    c = copy.deepcopy(BASE)
    mutate(c)
    return check_config(validate_schema(c))


def test_shipped_config_is_valid_and_defaults_filled():
    c = load_config(REPO / "config.yaml")
    assert c["retrieval"]["k"] == 100 and c["evaluation"]["threshold_m"] == 25
    assert c["datasets"]["demo"]["on_bad_name"] == "error"
    assert c["global_methods"]["vlad_sift"]["extraction"]["chunk_size"] == 1024


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["retrieval"].update(k=0), "0 is less than the minimum of 1"),
        (lambda c: c["retrieval"].update(top_k=5), "Additional properties are not allowed ('top_k'"),
        (lambda c: c["global_methods"]["vlad_sift"]["model"].update(name="netvlad"),
         "global_methods.vlad_sift.model.name: unknown global model 'netvlad'; known: ['boq', 'cosplace', 'eigenplaces', 'megaloc', 'mixvpr', 'salad', 'vlad']"),
        (lambda c: c.pop("datasets"), "'datasets' is a required property"),
        (lambda c: c["evaluation"].update(threshold_m=-5), "less than or equal to the minimum of 0"),
        (lambda c: c["datasets"].update({"bad name": {"root": "x"}}), "does not match"),
        (lambda c: c["global_methods"]["vlad_sift"].update({"import": {"demo": "x.h5"}}), "vlad_sift"),
        (lambda c: c["global_methods"]["vlad_sift"]["extraction"].update(device="gpu"), "'gpu' does not match"),
    ],
)
def test_schema_errors_are_clear(mutate, message):
    with pytest.raises(Exception) as e:
        validated(mutate)
    assert message in str(e.value)


def test_unknown_model_option_named():
    with pytest.raises(ConfigError, match=r"global_methods.vlad_sift.model: unknown option 'n_cluster'"):
        validated(lambda c: c["global_methods"]["vlad_sift"]["model"].update(n_cluster=3))


def test_import_for_unknown_dataset():
    with pytest.raises(ConfigError, match="'nowhere', which is not under datasets"):
        validated(lambda c: c["global_methods"]["cosplace_thesis"]["import"].update(nowhere="x.h5"))


def test_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("datasets: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_snakemake_refuses_bad_config(tmp_path):
    import subprocess

    c = copy.deepcopy(BASE)
    c["retrieval"]["k"] = "many"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(c))
    r = subprocess.run(
        ["snakemake", "-n", "--snakefile", str(REPO / "Snakefile"), "-d", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert r.returncode != 0
    assert "'many' is not of type 'integer'" in r.stdout + r.stderr


def test_commented_examples_in_config_are_valid():
    """The commented-out entries users are told to enable must validate too."""
    import re

    text = (REPO / "config.yaml").read_text()
    enabled = re.sub(r"\n  # (\w+: \{)", r"\n  \1", text).replace("/path/to/", "")
    c = yaml.safe_load(enabled)
    assert "r2d2_ransac" in c["rerank_methods"] and "superglue" in c["matchers"]
    check_config(validate_schema(c))


def test_model_names_come_from_the_registries():
    """The schema lists no model names: each section's names are checked against its registry,
    whose error lists the known ones (adding a model is one file plus one registry line)."""
    from pipeline.config import SCHEMA
    from pipeline.global_features import REGISTRY as GLOBAL
    from pipeline.local_features import REGISTRY as LOCAL
    from pipeline.matchers import REGISTRY as MATCHERS
    from pipeline.scorers import REGISTRY as SCORERS

    assert "enum: [sift" not in SCHEMA.read_text() and "enum: [cosplace" not in SCHEMA.read_text()
    cases = [
        (lambda c, n: c["global_methods"]["vlad_sift"]["model"].update(name=n), GLOBAL,
         "global_methods.vlad_sift.model.name"),
        (lambda c, n: c["local_features"]["sift"].update(name=n), LOCAL, "local_features.sift.name"),
        (lambda c, n: c["matchers"]["mnn_ratio"].update(name=n), MATCHERS, "matchers.mnn_ratio.name"),
        (lambda c, n: c["scorers"]["ransac"].update(name=n), SCORERS, "scorers.ransac.name"),
    ]
    for mutate, registry, where in cases:
        with pytest.raises(ConfigError) as e:
            validated(lambda c: mutate(c, "nosuchmodel"))
        assert str(e.value).startswith(f"{where}: unknown") and str(sorted(registry.models)) in str(e.value)


@pytest.mark.parametrize(
    "section, name, option, value, message",
    [
        ("local_features", "sift", "max_keypoints", -10, "local_features.sift.max_keypoints is -10: must be a whole number >= 1, or -1 / null"),
        ("local_features", "sift", "max_keypoints", 2.5, "must be a whole number >= 1"),
        ("local_features", "sift", "resize_max", 0, "must be null or a whole number >= 1"),
        ("scorers", "ransac", "threshold", -24, "scorers.ransac.threshold is -24: must be a number > 0"),
        ("scorers", "ransac", "max_iters", 0, "scorers.ransac.max_iters is 0: must be a whole number >= 1"),
        ("scorers", "ransac", "confidence", 1.5, "must be a probability in (0, 1]"),
        ("matchers", "mnn_ratio", "ratio", 0, "must be in (0, 1] or null"),
    ],
)
def test_model_options_have_types_and_ranges(section, name, option, value, message):
    """Counts, sizes and thresholds of every model/matcher/scorer conf are checked up front
    (max_keypoints -10 kept all but 10 keypoints; a negative RANSAC threshold scored nothing)."""
    with pytest.raises(ConfigError) as e:
        validated(lambda c: c[section][name].update({option: value}))
    assert message in str(e.value)
    # and when a model is built directly
    from pipeline.local_features import build_model
    from pipeline.scorers import build_scorer

    if section == "local_features":
        with pytest.raises(ValueError, match=option):
            build_model({"name": "sift", option: value})
    if section == "scorers":
        with pytest.raises(ValueError, match=option):
            build_scorer({"name": "ransac", option: value})
