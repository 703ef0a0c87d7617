"""Loading and checking config.yaml: JSON-schema validation plus model-conf checks.

The Snakefile calls :func:`check_config` right after ``snakemake.utils.validate``
so mistakes surface before any job runs, with the offending key named.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from .global_features import REGISTRY as GLOBAL
from .local_features import REGISTRY as LOCAL
from .local_store import split_conf
from .matchers import REGISTRY as MATCHERS
from .scorers import REGISTRY as SCORERS

SCHEMA = Path(str(resources.files("pipeline") / "schemas" / "config.schema.yaml"))


class ConfigError(ValueError):
    """A configuration that cannot run."""


def validate_schema(config: dict) -> dict:
    """Validate against the JSON schema and fill defaults (in place); return it."""
    from snakemake.utils import validate

    validate(config, str(SCHEMA), set_default=True)
    return config


def check_config(config: dict) -> dict:
    """Checks the schema cannot express: model options, method/dataset references."""
    for name, method in config["global_methods"].items():
        if "model" in method:
            _check_model(GLOBAL, method["model"], f"global_methods.{name}.model")
        for dataset in method.get("import", {}):
            if dataset not in config["datasets"]:
                raise ConfigError(
                    f"global_methods.{name}.import names dataset {dataset!r}, which is not under datasets: "
                    f"{sorted(config['datasets'])}"
                )
    listed = (config.get("default_target") or {}).get("methods") or []
    unknown = [m for m in listed if m not in config["global_methods"] and m not in config.get("rerank_methods", {})]
    if unknown:
        raise ConfigError(f"default_target.methods names {unknown}, which are neither global_methods "
                          f"{sorted(config['global_methods'])} nor rerank_methods {sorted(config.get('rerank_methods', {}))}")
    for section, registry in (("local_features", LOCAL), ("matchers", MATCHERS), ("scorers", SCORERS)):
        for name, conf in config.get(section, {}).items():
            if section == "local_features":  # storage options of the feature store, not the model's
                try:
                    conf, _ = split_conf(conf)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
            _check_model(registry, conf, f"{section}.{name}")
    if "images" in config.get("local_features", {}):
        raise ConfigError("local_features: 'images' is reserved (it names the inputs of image-input matchers)")
    for name, method in config.get("rerank_methods", {}).items():
        if name in config["global_methods"]:
            raise ConfigError(f"rerank_methods.{name}: a global method has the same name (results would collide)")
        for key, section in (("retrieval", "global_methods"), ("features", "local_features"),
                             ("matcher", "matchers"), ("scorer", "scorers")):
            if key == "features" and method.get(key) is None:
                continue
            if method[key] not in config.get(section, {}):
                raise ConfigError(
                    f"rerank_methods.{name}.{key} is {method[key]!r}, which is not under {section}: "
                    f"{sorted(config.get(section, {}))}"
                )
        check_method_kinds(name, method, config)
        fit = (method.get("gate") or {}).get("fit")
        if fit and fit["dataset"] not in config["datasets"]:
            raise ConfigError(f"rerank_methods.{name}.gate.fit.dataset is {fit['dataset']!r}, which is not under "
                              f"datasets: {sorted(config['datasets'])}")
        if method["k"] > config["retrieval"]["k"]:
            raise ConfigError(f"rerank_methods.{name}.k={method['k']} exceeds retrieval.k={config['retrieval']['k']}")
    for name, ns in config.get("nightsets", {}).items():
        db = config["datasets"].get(ns["database"])
        if db is None or not db.get("root") or db.get("nightset"):
            raise ConfigError(f"nightsets.{name}.database is {ns['database']!r}: it must be a dataset with a root "
                              "(whose database images verify the night queries)")
        lon0, lat0, lon1, lat1 = ns["bbox"]
        if not (-180 <= lon0 < lon1 <= 180 and -90 <= lat0 < lat1 <= 90):
            raise ConfigError(f"nightsets.{name}.bbox {ns['bbox']} is not [min_lon, min_lat, max_lon, max_lat]")
    for name, ds in config["datasets"].items():
        if ds.get("nightset"):
            if ds["nightset"] not in config.get("nightsets", {}):
                raise ConfigError(f"datasets.{name}.nightset is {ds['nightset']!r}, which is not under nightsets")
            if ds.get("root") or ds.get("synthetic") is not None:
                raise ConfigError(f"datasets.{name}: a nightset dataset gets its root from the workflow; drop root/synthetic")
            ds["root"] = f"{config.get('work_dir', 'work')}/nightsets/{ds['nightset']}/dataset"
        if ds.get("synthetic") is not None and not ds.get("root"):
            raise ConfigError(f"datasets.{name}: a synthetic dataset needs a root to be generated into")
    return config


def _check_model(registry, conf: dict, where: str) -> None:
    """A model conf names a registered model and only its options, in range."""
    try:
        registry.get(conf["name"])
    except ValueError as e:  # the registry lists the known names
        raise ConfigError(f"{where}.name: {e}") from None
    try:
        registry.full_conf(conf, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_method_kinds(name: str, method: dict, config: dict) -> None:
    """The matcher's inputs fit the features entry; the scorer reads what the matcher writes."""
    matcher = MATCHERS.get(config["matchers"][method["matcher"]]["name"])
    scorer = SCORERS.get(config["scorers"][method["scorer"]]["name"])
    if matcher.inputs == "images" and method.get("features") is not None:
        raise ConfigError(f"rerank_methods.{name}: matcher {method['matcher']!r} reads images; set features: null")
    if matcher.inputs == "features" and method.get("features") is None:
        raise ConfigError(f"rerank_methods.{name}: matcher {method['matcher']!r} needs local features; set features")
    produced = "pair_score" if matcher.output == "pair_score" else "matches"
    if scorer.needs != produced:
        raise ConfigError(
            f"rerank_methods.{name}: scorer {method['scorer']!r} needs {scorer.needs}, but matcher "
            f"{method['matcher']!r} gives {matcher.output} (use a pair_score scorer with pair models, "
            "a geometric scorer with matches)"
        )


def load_config(path) -> dict:
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return check_config(validate_schema(config))
