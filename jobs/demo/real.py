"""`influence demo --preset real`: the cross-lingual demo on pretrained models over aligned documents.

SmolLM2-135M-Instruct and Gemma-3-270M (made available offline by `jobs.models.materialize_real_models`) over a
corpus of aligned documents: Bible passages, chatterbot dialogues and shutdown passages, each in English, Korean and
Turkish (`jobs.demo.parallel`). Each model gets its own tokenised corpus, factors and index; the compare measures
cross-lingual influence through the alignment over both real models and, as a separate series, the three tiny sizes
of the `full` preset. `--preset real-tiny` runs that pipeline on a tiny Llama and a tiny Gemma 3 built from configs
and trained for a few steps on a small aligned corpus (what the tests run).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from influence.arguments import CorpusArgs, FactorArgs, IndexArgs, QueryArgs
from influence.artifacts import write_parquet
from influence.corpus import load_sequences, prepare_corpus
from influence.errors import InfluenceError
from influence.stage import Executor
from jobs.demo import DemoRun, write_json, build_demo, shutdown_queries


#: where `--preset real` looks for (or materializes) the two pretrained models: this variable, else WORK_DIR/models
MODELS_DIR_ENV = "INFLUENCE_MODELS_DIR"
PRETRAINED_SERIES = "pretrained"
STAND_IN_SERIES = "tiny stand-ins (real-tiny)"
TINY_SERIES = "tiny, trained on chatterbot here"


@dataclass(frozen=True)
class StandInSpec:
    """A tiny model built from a config and trained briefly: what the `real-tiny` preset runs instead of a real one."""

    name: str
    architecture: str   # "llama" (SmolLM2's architecture) or "gemma3" (Gemma 3's)
    vocab_size: int     # each stand-in gets its own byte-level BPE, as each real model has its own tokenizer
    hidden: int
    layers: int
    heads: int
    steps: int


@dataclass(frozen=True)
class RealPreset:
    """The cross-lingual demo on pretrained models over aligned documents (`jobs.demo.parallel`).

    `groups_per_source` is the size knob: the corpus holds that many aligned groups from each source (Bible passages,
    chatterbot dialogues, shutdown passages), each in English, Korean and Turkish, so 9 x groups_per_source documents
    at most (the shutdown source has 24 groups).
    """

    groups_per_source: int
    sources: tuple[str, ...] = ("bible", "chatterbot", "shutdown")
    max_length: int = 1024          # long enough that no document is cut (SmolLM2 spells a Korean passage in up to ~600 tokens)
    sketch_dim: int = 8192
    tiny_preset: Optional[str] = "full"     # the preset whose trained sizes are compared as a separate series
    stand_ins: tuple[StandInSpec, ...] = ()  # empty: the two real models of jobs.models.REAL_MODELS
    context: int = 512              # the stand-ins' context (their small vocabularies spend ~300 tokens on a query)
    batch_size: int = 8             # the stand-ins' training batch
    top_k: int = 10                 # documents compared per query and sign
    compare_generator: str = "exact"  # a corpus this small is scanned exactly: one pass gives every score the compare needs
    candidates: int = 20            # most candidates re-ranked per sign in the report's query (index generator)
    report_top_k: int = 3
    batch_tokens: int = 512         # Gemma's 262k-word vocabulary: 0.5 GiB of logits per 512 tokens, in each of 2 workers
    index_shard_size: int = 16      # sequences per index shard: a corpus this small still keeps every worker busy


REAL_PRESETS = {
    # SmolLM2-135M-Instruct and Gemma-3-270M over 27 documents each (9 per language). Sized by measurement on the
    # 2-core machine, quiet, in CPU seconds on one thread: the eigendecompositions, 136 s (SmolLM2's 90 modules) and
    # 243 s (Gemma's 54); then per token 80 ms (SmolLM2) / 173 ms (Gemma) for fit and index, 61 / 133 ms for the
    # compare's exact scan (three queries). The 27 documents are 3451 SmolLM2 tokens (it spells Korean in 4x the tokens
    # of English) and 1618 Gemma tokens. Estimate on two workers: ~19 min with the report and ~2.5 min of loading and
    # writing factors, plus 6-10 min for the `full` preset's tiny models when they are not cached; each further group
    # adds ~3 min. Resize with `groups_per_source=` (run_demo) or `--groups-per-source`.
    "real": RealPreset(groups_per_source=3, top_k=5),
    # a tiny Llama and a tiny Gemma 3 on 3 aligned groups per source: the real preset's pipeline in seconds (tests)
    "real-tiny": RealPreset(groups_per_source=3, max_length=256, sketch_dim=256, tiny_preset=None, top_k=5, candidates=20,
                            stand_ins=(StandInSpec("tiny-llama", "llama", 512, 24, 2, 2, 30),
                                       StandInSpec("tiny-gemma3", "gemma3", 768, 32, 2, 2, 30))),
}


@dataclass
class RealRun:
    """Paths of everything the real preset built, per model name, and the seconds each step took."""

    work_dir: Path
    documents: Path
    models: dict[str, Path]
    corpora: dict[str, Path]
    factors: dict[str, Path]
    indexes: dict[str, Path]
    tiny: Optional[DemoRun]
    series: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def runs(self) -> dict[str, Path]:
        """Every index the compare reads: the real (or stand-in) models, then the tiny series."""
        tiny = {f"tiny-{name}": path for name, path in self.tiny.indexes.items()} if self.tiny is not None else {}
        return {**self.indexes, **tiny}


def _timed(timings: dict[str, float], key: str, start: float) -> None:
    timings[key] = round(time.perf_counter() - start, 2)


def real_model_dirs(work_dir: Path | str, progress: bool = True) -> dict[str, Path]:
    """The two pretrained models, from $INFLUENCE_MODELS_DIR or WORK_DIR/models (materialized there when missing)."""
    from jobs.models import materialize_real_models

    models_dir = os.environ.get(MODELS_DIR_ENV) or Path(work_dir) / "models"
    return materialize_real_models(Path(models_dir), progress=progress)


def build_stand_ins(run_dir: Path, documents: pa.Table, preset: RealPreset, progress: bool = True) -> dict[str, Path]:
    """Build and briefly train each of the preset's tiny stand-in models on the aligned documents (cached)."""
    from jobs.demo.tiny import build_model, build_tokenizer, train_model

    texts = documents["text"].to_pylist()
    models = {}
    for spec in preset.stand_ins:
        model_dir = run_dir / "models" / spec.name
        if not (model_dir / "training.json").exists():
            tokenizer = build_tokenizer(texts, spec.vocab_size)
            build_model(model_dir, tokenizer, spec.architecture, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                        context=preset.context)
            ids = [tokenizer(t)["input_ids"][: preset.context] for t in texts]
            train_model(model_dir, ids, steps=spec.steps, batch_size=preset.batch_size, progress=progress)
        models[spec.name] = model_dir
    return models


def real_preset(preset_name: str, groups_per_source: Optional[int] = None) -> RealPreset:
    """A real preset by name, with its corpus size replaced when `groups_per_source` is given."""
    if preset_name not in REAL_PRESETS:
        raise InfluenceError(f"unknown real preset {preset_name!r}; choose one of {', '.join(REAL_PRESETS)}")
    if groups_per_source is None:
        return REAL_PRESETS[preset_name]
    if isinstance(groups_per_source, bool) or not isinstance(groups_per_source, int) or groups_per_source < 1:
        raise InfluenceError(f"groups_per_source must be a positive integer, got {groups_per_source!r}")
    return replace(REAL_PRESETS[preset_name], groups_per_source=groups_per_source)


def build_real(work_dir: Path | str, preset_name: str = "real", executor: Optional[Executor] = None,
               progress: bool = True, groups_per_source: Optional[int] = None) -> RealRun:
    """Build (or reuse) the aligned documents, and per model its corpus, factors and index, under
    WORK_DIR/PRESET/<groups>-groups (so another corpus size never meets this one's artifacts); then the tiny series."""
    from indexes.build import build_index
    from influence.factors import fit_factors
    from jobs.demo.parallel import parallel_documents

    preset, work_dir = real_preset(preset_name, groups_per_source), Path(work_dir)
    run_dir = work_dir / preset_name / f"{preset.groups_per_source}-groups"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    documents = run_dir / "documents.parquet"
    table = parallel_documents(preset.groups_per_source, preset.sources)
    if not documents.exists() or not pq.read_table(documents).equals(table):
        write_parquet(documents, table)  # a changed table (other installed packages) makes the corpora refuse to be reused
    _timed(timings, "documents", start)
    start = time.perf_counter()
    if preset.stand_ins:
        models, series = build_stand_ins(run_dir, table, preset, progress), STAND_IN_SERIES
    else:
        models, series = real_model_dirs(work_dir, progress), PRETRAINED_SERIES
    _timed(timings, "models", start)
    corpora, factors, indexes = {}, {}, {}
    max_length = min(preset.max_length, preset.context) if preset.stand_ins else preset.max_length
    for name, model_dir in models.items():
        start = time.perf_counter()
        corpora[name] = prepare_corpus(documents, model_dir, run_dir / "corpus" / name, CorpusArgs(max_length=max_length),
                                       progress=progress)
        _timed(timings, f"corpus {name}", start)
        start = time.perf_counter()
        factors[name] = fit_factors(model_dir, corpora[name], run_dir / "factors" / name,
                                    FactorArgs(progress=progress, batch_tokens=preset.batch_tokens), executor)
        _timed(timings, f"fit {name}", start)
        start = time.perf_counter()
        indexes[name] = build_index(model_dir, factors[name], corpora[name], run_dir / "indexes" / name,
                                    IndexArgs(progress=progress, sketch_dim=preset.sketch_dim, batch_tokens=preset.batch_tokens,
                                              shard_size=preset.index_shard_size), executor)
        _timed(timings, f"index {name}", start)
    tiny = None
    if preset.tiny_preset is not None:
        start = time.perf_counter()
        tiny = build_demo(work_dir, preset.tiny_preset, executor, progress)
        _timed(timings, f"tiny series ({preset.tiny_preset} preset)", start)
    run_series = {name: series for name in indexes}
    if tiny is not None:
        run_series.update({f"tiny-{name}": TINY_SERIES for name in tiny.indexes})
    return RealRun(run_dir, documents, models, corpora, factors, indexes, tiny, run_series, timings)


def corpus_sizes(run: RealRun) -> dict:
    """Per model: sequences and tokens, by language and by source (what the README reports)."""
    sizes = {}
    for name, corpus_dir in run.corpora.items():
        sequences, _ = load_sequences(corpus_dir)
        rows = sequences.select(["lang", "source", "num_tokens"]).to_pylist()
        by = {}
        for key in ("lang", "source"):
            for value in sorted({r[key] for r in rows}):
                chosen = [r["num_tokens"] for r in rows if r[key] == value]
                by.setdefault(key, {})[value] = {"sequences": len(chosen), "tokens": int(sum(chosen))}
        sizes[name] = {"sequences": len(rows), "tokens": int(sum(r["num_tokens"] for r in rows)), **{f"by_{k}": v for k, v in by.items()}}
    return sizes


def run_real_demo(work_dir: Path | str = "demo_runs", preset_name: str = "real", executor: Optional[Executor] = None,
                  progress: bool = True, groups_per_source: Optional[int] = None) -> dict:
    """The real preset end to end: build, ask the shutdown query in en/ko/tr on the largest model (report), compare
    every run through the alignment; writes sizes.json and timings.json beside the artifacts. Returns what `run_demo` does."""
    from indexes.engine import QueryEngine
    from jobs.compare import run_compare
    from jobs.demo.parallel import align_document
    from jobs.report import render_terminal, save_results

    start = time.perf_counter()
    preset = real_preset(preset_name, groups_per_source)
    run = build_real(work_dir, preset_name, executor, progress, groups_per_source)
    if executor is not None:
        # the workers still hold each model's factors and basis (4-6 GiB for Gemma-3-270M); the report's and the
        # compare's query engines need that memory on a 24 GiB machine
        executor.release()
    queries = shutdown_queries()
    largest = list(run.indexes)[-1]
    tick = time.perf_counter()
    engine = QueryEngine(run.indexes[largest], QueryArgs(top_k=preset.report_top_k, candidates=preset.candidates,
                                                         batch_tokens=preset.batch_tokens))
    results = engine.query(queries)
    del engine
    gc.collect()
    report_dir = save_results(results, run.work_dir / "report")
    _timed(run.timings, f"report ({largest})", tick)
    tick = time.perf_counter()
    compare_dir = run_compare(run.runs, queries, run.work_dir / "compare",
                              QueryArgs(top_k=preset.top_k, candidates=max(preset.candidates, preset.top_k), per_token=False,
                                        generator=preset.compare_generator, batch_tokens=preset.batch_tokens), executor,
                              series=run.series, align=align_document)
    _timed(run.timings, "compare", tick)
    seconds = time.perf_counter() - start
    sizes = corpus_sizes(run)
    documents = pq.read_table(run.documents).select(["source", "lang"]).to_pylist()
    summary = {"preset": preset_name, "settings": asdict(preset), "documents": len(documents),
               "documents_by_source": {s: sum(d["source"] == s for d in documents) for s in sorted({d["source"] for d in documents})},
               "models": sizes}
    write_json(run.work_dir / "sizes.json", summary)
    write_json(run.work_dir / "timings.json", {"seconds": round(seconds, 1), "steps": run.timings, "cpus": os.cpu_count(),
                                                "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None})
    sequences, _ = load_sequences(run.corpora[largest])
    return {"run": run, "results": results, "terminal": render_terminal(results), "report": report_dir / "report.html",
            "compare": compare_dir, "seconds": seconds, "num_sequences": sequences.num_rows, "largest": largest,
            "sizes": summary}
