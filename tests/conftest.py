import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# Under pytest-xdist (the README's `-n 2`), each worker and what it starts use one thread: two workers of two threads
# each on two cores spend their time waiting on each other's OpenMP threads
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# `datasets` caches a file's Arrow copy and every map by the file's path as written: the tests read the data through a
# new folder each (`fresh_clone_cwd`), so their caches go to a folder of this session's, removed at its end, not into
# the user's ~/.cache (unless HF_DATASETS_CACHE says where)
if "HF_DATASETS_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="nca-trl-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VICUNA = REPO / "data" / "vicuna_rated.jsonl"
# A 202-row slice of Anthropic HH-RLHF helpful-base (test split) shipped with the tests: see tests/data/README.md
HH = REPO / "tests" / "data" / "hh_helpful_test.jsonl"


# The test files that take longest on 2 cores, longest first. The README's `-n 2 --dist loadfile` hands whole files to
# the two workers in collection order; pytest-xdist would otherwise sort the files by their number of tests, which put
# these (few, long tests) last, where one worker was still running them while the other had nothing left
LONGEST_FIRST = ("test_doc_blocks.py", "test_distributed.py", "test_gpu_scale.py", "test_reproduce.py",
                 "test_model_families.py", "test_wheel.py", "test_iterate.py", "test_reliability.py",
                 "test_trainer.py", "test_benchmark.py", "test_packing.py", "test_streaming.py", "test_launch.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's reordering by number of tests (above)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """`LONGEST_FIRST`'s files first, in that order; every file's tests keep their order (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def load_script(name: str):
    """A script of `scripts/` (not a package) imported as a module, e.g. `load_script("plan_memory")`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    """Path of a tiny random Mistral (seed 0) with the real Mistral-7B tokenizer."""
    from nca_trl.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral", seed=0)


@pytest.fixture(scope="session")
def tiny_mistral_ref(tmp_path_factory):
    """Another tiny Mistral, same architecture and tokenizer, different weights (seed 1): an explicit reference."""
    from nca_trl.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral-ref"), "mistral", seed=1)


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory):
    from nca_trl.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_mistral):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_mistral)


@pytest.fixture(scope="session")
def vicuna():
    from datasets import load_dataset

    return load_dataset("json", data_files=str(VICUNA), split="train")


@pytest.fixture(scope="session")
def hh():
    from datasets import load_dataset

    return load_dataset("json", data_files=str(HH), split="train")


@pytest.fixture(scope="session")
def launch_env(tmp_path_factory):
    """Environment of the `accelerate launch` tests (tests/launching.py): offline, one thread per process, and one
    DeepSpeed extension cache for the session (TORCH_EXTENSIONS_DIR, or a temporary folder)."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.getbasetemp() / "torch_extensions"))
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    return env


@pytest.fixture(autouse=True)
def fresh_clone_cwd(tmp_path_factory, monkeypatch):
    """Every test runs in a folder laid out like a fresh clone (each top-level entry of the checkout, linked) with no
    `outputs/`: what the tests read by relative path (`data/...`, `recipes/...`) is there, and what the README's quick
    start leaves in `outputs/` (the tiny models it makes, runs) neither changes how a relative `outputs/tiny-*` reads
    (a local path once `outputs/` exists) nor receives anything a test writes by relative path."""
    root = tmp_path_factory.mktemp("clone")
    for entry in REPO.iterdir():
        if entry.name not in ("outputs", ".git"):
            (root / entry.name).symlink_to(entry)
    monkeypatch.chdir(root)
    return root
