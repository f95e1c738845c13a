"""Loading an artifact never unpickles it: artifacts can come from anyone, and unpickling runs their code.

Two proofs. Statically, an AST scan of influence/, indexes/ and jobs/ finds no pickle-family import, no
torch.load, no np.load without allow_pickle=False, no unsafe YAML loader, no eval/exec and no
trust_remote_code (the scanner is itself tested on snippets). Behaviourally, a live malicious pickle (it
creates a marker file when unpickled) is planted under each artifact's file names; every loader must
refuse it with an InfluenceError, and the marker must never appear.
"""

from __future__ import annotations

import ast
import pickle
import shutil
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from influence.corpus import load_sequences
from influence.documents import load_documents
from influence.errors import InfluenceError
from influence.factors import load_factors
from influence.models import load_model, load_tokenizer
from influence.queries import load_queries

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("influence", "indexes", "jobs")

# --- the static scan --------------------------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal", "jsonpickle", "torch.serialization"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted module or object it was imported as (`np` -> `numpy`, `load` -> `torch.load`)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    """`np.load` -> `numpy.load`, through import aliases; '' for anything that is not a dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_safe_loader(node: ast.AST, aliases: dict[str, str], assignments: dict[str, list[ast.AST]]) -> bool:
    if isinstance(node, ast.Name) and node.id in assignments:  # a module-level alias such as _LOADER = yaml.CBaseLoader
        return all(_is_safe_loader(value, aliases, {}) for value in assignments[node.id])
    return _dotted(node, aliases).rsplit(".", 1)[-1] in SAFE_YAML_LOADERS


def unsafe_loading(source: str) -> list[str]:
    """Every way `source` could deserialise code: `line: what` strings, empty when the source is safe."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    assignments: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assignments.setdefault(target.id, []).append(node.value)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            imported = modules + ([f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else [])
            for name in imported:
                if name in PICKLE_MODULES or name.split(".")[0] in PICKLE_MODULES or name in ("torch.load", "numpy.load"):
                    found.append(f"{node.lineno}: imports {name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        short = name.rsplit(".", 1)[-1]
        if name.split(".")[0] in PICKLE_MODULES or name in ("torch.load", "torch.jit.load") or short == "read_pickle":
            found.append(f"{node.lineno}: calls {name}")
        if name in ("numpy.load",):
            allow = _keyword(node, "allow_pickle")
            if not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{node.lineno}: calls numpy.load without allow_pickle=False")
        if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            found.append(f"{node.lineno}: calls {name}")
        if name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or not _is_safe_loader(loader, aliases, assignments):
                found.append(f"{node.lineno}: calls {name} with an unsafe Loader")
        if name in ("eval", "exec"):
            found.append(f"{node.lineno}: calls {name}")
        for keyword, unsafe in (("trust_remote_code", True), ("weights_only", False)):
            value = _keyword(node, keyword)
            if value is not None and not (isinstance(value, ast.Constant) and value.value is (not unsafe)):
                found.append(f"{node.lineno}: passes {keyword}={ast.unparse(value)}")
    return found


UNSAFE_SNIPPETS = [
    "import pickle\npickle.loads(data)",
    "from pickle import load",
    "import cloudpickle",
    "import joblib\njoblib.load(path)",
    "import dill",
    "import torch\ntorch.load(path)",
    "import torch as t\nt.load(path, weights_only=False)",
    "from torch import load",
    "import numpy as np\nnp.load(path)",
    "import numpy as np\nnp.load(path, allow_pickle=True)",
    "import pandas as pd\npd.read_pickle(path)",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(text)",
    "import yaml\nL = yaml.UnsafeLoader\nyaml.load(text, Loader=L)",
    "eval(text)",
    "from transformers import AutoModel\nAutoModel.from_pretrained(d, trust_remote_code=True)",
]
SAFE_SNIPPETS = [
    "import numpy as np\nnp.load(path, mmap_mode='r', allow_pickle=False)",
    "import yaml\nyaml.load(text, Loader=yaml.CBaseLoader)",
    "import yaml\ntry:\n    L = yaml.CSafeLoader\nexcept AttributeError:\n    L = yaml.SafeLoader\nyaml.load(text, Loader=L)",
    "from safetensors.torch import load_file\nload_file(path)",
    "import json\njson.loads(text)",
    "model.eval()",
]


@pytest.mark.parametrize("snippet", UNSAFE_SNIPPETS)
def test_scanner_flags_unsafe_loading(snippet):
    assert unsafe_loading(textwrap.dedent(snippet)), snippet


@pytest.mark.parametrize("snippet", SAFE_SNIPPETS)
def test_scanner_passes_safe_loading(snippet):
    assert unsafe_loading(textwrap.dedent(snippet)) == [], snippet


def test_library_source_never_unpickles():
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 10
    findings = {str(path.relative_to(ROOT)): unsafe_loading(path.read_text(encoding="utf-8")) for path in files}
    assert {path: found for path, found in findings.items() if found} == {}


# --- the behavioural proof --------------------------------------------------------------------------------

class Payload:
    """Unpickling this creates `marker`: the stand-in for arbitrary code an attacker would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path, how: str = "pickle") -> None:
    """Replace `path` by a live malicious payload: a raw pickle, or a NumPy object array holding one."""
    path.unlink(missing_ok=True)
    if how == "npy":
        with path.open("wb") as handle:
            np.save(handle, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def test_the_payload_is_live(tmp_path):
    """The control: unpickling the planted bytes does run code, so a missing marker below means something."""
    path, marker = tmp_path / "payload", tmp_path / "marker"
    plant(path, marker)
    pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()
    plant(path, marker, "npy")
    np.load(path, allow_pickle=True)
    assert marker.exists()


def _fit_resume(a):
    from influence.arguments import FactorArgs
    from influence.factors import fit_factors

    for name in ("manifest.json", "factors.safetensors", "eigenvectors.safetensors"):
        (a["factors"] / name).unlink(missing_ok=True)
    return fit_factors(a["model"], a["corpus"], a["factors"], FactorArgs(progress=False))


def _merge(a):
    from indexes.store import merge_sketch_shards

    return merge_sketch_shards(a["index"], 1, progress=False)


def _engine(a):
    from indexes.engine import QueryEngine

    return QueryEngine(a["index"], model_dir=a["model"], factors_dir=a["factors"], corpus_dir=a["corpus"])


def _text_index(a):
    from indexes.text import load_text_index

    sequences, manifest = load_sequences(a["corpus"])
    return load_text_index(a["index"], manifest["corpus_fingerprint"], sequences.num_rows)


def _bin_weights(a):
    (a["model"] / "model.safetensors").unlink()  # so that transformers falls back to pytorch_model.bin
    return load_model(a["model"])


SHARD = "sketch_shard_00000_of_00001"
# (artifact, file planted, how, loader): the loaders are the ones every stage reads that artifact with.
PLANTS: list[tuple[str, str, str, Callable]] = [
    ("factors", "factors.safetensors", "pickle", lambda a: load_factors(a["factors"])),
    ("factors", "manifest.json", "pickle", lambda a: load_factors(a["factors"])),
    ("factors", "covariance_sums.safetensors", "pickle", _fit_resume),
    ("factors", "args.json", "pickle", _fit_resume),
    ("index", f"{SHARD}/sketches.npy", "npy", _merge),
    ("index", f"{SHARD}/sketches.npy", "pickle", _merge),
    ("index", f"{SHARD}/rows.parquet", "pickle", _merge),
    ("index", "sketches.npy", "npy", _engine),
    ("index", "sketches.npy", "pickle", _engine),
    ("index", "docs.parquet", "pickle", _engine),
    ("index", "index.json", "pickle", _engine),
    ("index", "manifest.json", "pickle", _engine),
    ("index", "text_index/data.csc.index.npy", "npy", _text_index),
    ("index", "text_index/indices.csc.index.npy", "pickle", _text_index),
    ("index", "text_index/vocab.index.json", "pickle", _text_index),
    ("index", "text_index/params.index.json", "pickle", _text_index),
    ("index", "text_index/text_index.json", "pickle", _text_index),
    ("corpus", "sequences.parquet", "pickle", lambda a: load_sequences(a["corpus"])),
    ("corpus", "manifest.json", "pickle", lambda a: load_sequences(a["corpus"])),
    ("model", "model.safetensors", "pickle", lambda a: load_model(a["model"])),
    ("model", "pytorch_model.bin", "pickle", _bin_weights),
    ("model", "tokenizer.json", "pickle", lambda a: load_tokenizer(a["model"])),
    ("documents", "docs.parquet", "pickle", lambda a: load_documents(a["documents"] / "docs.parquet")),
    ("documents", "docs.jsonl", "pickle", lambda a: load_documents(a["documents"] / "docs.jsonl")),
    ("documents", "queries.jsonl", "pickle", lambda a: load_queries(a["documents"] / "queries.jsonl")),
    ("datasets", "data-00000-of-00001.arrow", "pickle", lambda a: load_documents(a["datasets"])),
]


@pytest.fixture(scope="module")
def datasets_folder(tmp_path_factory):
    import datasets

    path = tmp_path_factory.mktemp("datasets_folder") / "docs"
    datasets.Dataset.from_dict({"text": ["a document", "another one"]}).save_to_disk(str(path))
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's weights-only unpickler, refusing pytorch_model.bin
@pytest.mark.parametrize("artifact, name, how, load", PLANTS, ids=[f"{a}/{n}:{h}" for a, n, h, _ in PLANTS])
def test_planted_pickle_is_refused_and_never_run(artifact, name, how, load, llama_dir, corpus_dir, ekfac_dir, index_dir,
                                                 datasets_folder, tmp_path):
    sources = {"model": llama_dir, "corpus": corpus_dir, "factors": ekfac_dir, "index": index_dir, "datasets": datasets_folder}
    copies = {key: shutil.copytree(src, tmp_path / key) for key, src in sources.items() if key in (artifact, "model")}
    copies = {**sources, **copies, "documents": tmp_path / "documents"}
    copies["documents"].mkdir()
    marker = tmp_path / "marker_created_by_unpickling"
    plant(copies[artifact] / name, marker, how)

    with pytest.raises(InfluenceError) as info:
        load(copies)
    assert "\n" not in str(info.value) and len(str(info.value)) < 2000
    assert not marker.exists(), "loading the artifact unpickled it"
