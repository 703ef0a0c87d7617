# Where every stored output lives: one function per output. Rules, input functions and the
# report spec build paths only through these. Called with wildcard strings ("{dataset}")
# they give the rules' output patterns; called with values, the files.
# (pipeline/config.py derives a night-set dataset's root as nightset_dataset() does.)


def index_dir(dataset):
    return f"{WORK}/{dataset}/index"


def index_table(dataset, split):
    """split: database, queries or skipped."""
    return f"{index_dir(dataset)}/{split}.csv"


def index_summary_file(dataset):
    return f"{index_dir(dataset)}/summary.json"


def global_dir(dataset, gmethod):
    return f"{WORK}/{dataset}/global/{gmethod}"


def fit_file(dataset, gmethod):
    return f"{global_dir(dataset, gmethod)}/fit.pt"


def shard_store(dataset, gmethod, shard):
    """shard: four digits ("0003") or "{shard}"."""
    return f"{global_dir(dataset, gmethod)}/database/shard_{shard}.zarr"


def queries_store(dataset, gmethod):
    return f"{global_dir(dataset, gmethod)}/queries.zarr"


def database_store(dataset, gmethod):
    return f"{global_dir(dataset, gmethod)}/database.zarr"


def faiss_index(dataset, gmethod):
    return f"{global_dir(dataset, gmethod)}/faiss.index"


def topk_file(dataset, gmethod):
    return f"{WORK}/{dataset}/topk/{gmethod}.h5"


def gate_fit_file(dataset, method):
    """A gate threshold learnt on ``dataset`` for a re-ranking method (rule gate_fit)."""
    return f"{WORK}/{dataset}/gate_fit/{method}.json"


def features_base(dataset):
    """The folder of a dataset's feature stores (one sub-folder per extractor conf)."""
    return f"{WORK}/{dataset}/local"


def features_file(dataset, features):
    """The index of an extractor's feature store on a dataset."""
    return f"{features_base(dataset)}/{features}.json"


def pair_stores(dataset):
    """Pair-keyed match stores shared by every retrieval and K of a dataset (pipeline/match_store.py)."""
    return f"{WORK}/{dataset}/matches/pairs"


def matches_file(dataset, retrieval, features, matcher):
    """features: an extractor entry, or IMAGES for image-input matchers."""
    return f"{WORK}/{dataset}/matches/{retrieval}/{features}+{matcher}.h5"


def rerank_file(dataset, method):
    return f"{WORK}/{dataset}/rerank/{method}.h5"


def results_file(dataset, method):
    return f"{RESULTS}/{dataset}/{method}.csv"


def uncertainty_files(dataset, gmethod):
    """Per-query confidence signals of a retrieval, their AUC-PR, and the precision-recall plot."""
    base = f"{RESULTS}/{dataset}/uncertainty/{gmethod}"
    return [f"{base}_signals.csv", f"{base}_auc_pr.csv", f"{base}_pr.png"]


def summary_files(dataset):
    return [f"{RESULTS}/{dataset}/{name}" for name in ("summary.csv", "summary_table.csv", "summary.md",
                                                         "summary.html")]


def report_folder():
    return f"{RESULTS}/report"


def weights_fetch_file(asset):
    """The record of fetch_weights: a registered file fetched and verified (its path, sha256)."""
    return f"{WORK}/weights/{asset}.json"


def data_fetch_file(asset):
    """The record of fetch_data: a registered data file fetched and verified."""
    return f"{WORK}/data/{asset}.json"


def published_stage1_file():
    """The thesis's published stage-1 files evaluated beside their published recalls."""
    return f"{RESULTS}/thesis/stage1.csv"


def weights_check_file(kind, name):
    return f"{WORK}/checks/weights/{kind}/{name}.json"


def random_weights_dir():
    return f"{WORK}/random_weights"


def random_weights_file(model, seed):
    """A random checkpoint (a file, or a folder for DELG's SavedModel variables)."""
    return f"{random_weights_dir()}/{model}_seed{seed}"


def stamp_file(output):
    """The marker of rebuild_if_inputs_missing for ``output``."""
    return f"{WORK}/stamps/{output}.stamp"


def nightset_dir(nightset):
    return f"{WORK}/nightsets/{nightset}"


def nightset_file(nightset, name):
    """collected/photos.csv, filtered.csv, dedup.csv, relabel/labels.csv, relabel/log.jsonl, dataset/counts.json"""
    return f"{nightset_dir(nightset)}/{name}"


def nightset_dataset(nightset):
    return f"{nightset_dir(nightset)}/dataset"


def log_file(name):
    return f"{WORK}/logs/{name}.log"
