"""Index-build benchmark: throughput, bytes per document, peak memory and sketch fidelity of the index stage.

Setup. Real text: chatterbot-corpus conversations in every language (`jobs.demo.chatterbot`), a seeded
permutation; the first `num_docs` documents form corpus N, the first `scale x num_docs` corpus 4N, and
held-out English first exchanges ("User: ...\\nAssistant:" -> " ...") are the queries. A byte-level BPE is
trained on corpus 4N, a tiny Llama (`jobs.demo.tiny`) is trained briefly on it (`train_model`, one
thread), and EK-FAC factors are fitted on corpus N (`fit_factors`). These artifacts are cached under
`--work-dir`, keyed by the settings.

1. Throughput. Each run is a fresh subprocess (so its peak RSS is its own), interleaved:
   - `ray job`: `jobs.index.run_index_job`, embedded local cluster, 2 workers (IndexArgs defaults);
   - `ray job, 128-row blocks (patched)`: the same job with the input handed to Ray Data in 128-row blocks
     instead of one block per shard (the proposed fix for idle workers; `ray.data.from_arrow` is wrapped
     in the subprocess, no library file is changed);
   - `in-process build_index` (corpus N only): `indexes.build.build_index` with 2 torch threads;
   - `bare x1`: a plain loop (forward, summed next-token loss, `backward()`) over the same sequences in
     the same batches, one process with 2 torch threads, stopped after `bare_max_seconds` (2 threads on a
     busy 2-core machine crawl); `bare x2`: two processes with one thread each over the two halves of the
     corpus (the Ray workers' layout).
   End-to-end rates include everything (Ray start-up, actor and model loading, the FAISS merge).
   Steady-state rates count, per worker, the rows after its first call (a call = one Ray batch of
   4 x batch_size rows) over the time from the end of that first call to the end of its last one, summed
   over workers. Worker calls are timed by a subclass of `SketchBatches` that also times
   `Sketcher.sketch_io` and the call's CPU time: CPU time per sequence is the comparison that background
   load on a shared machine distorts least, so ratios are given in both wall and CPU time.
2. Bytes per document on disk (index.faiss, docs.parquet, sketch shards) for the default sketch and size,
   for "Flat" and an IVF-PQ factory (the same shards merged again with `merge_sketch_shards`).
3. Peak RSS of the driver (VmHWM of the subprocess; getrusage's ru_maxrss is inherited across fork+exec)
   and of the Ray workers (psutil, polled in a background thread over the driver's descendants), at
   both sizes, with the phase in which the driver peaks.
4. Sketch fidelity on corpus N: for each k, Pearson and Spearman (per query, averaged, with standard
   errors) between sketch inner products and exact EK-FAC scores (`compute_scores`), and recall of the
   exact top-10 within the sketch top-{10, 50, 100}, for the library's sketches ("eigen", "kronecker")
   and two projections computed here at the same per-module sizes: a dense Gaussian projection of the
   flattened whitened gradient and a per-module subsampled randomised Hadamard transform (SRHT).
   Library sketches come from `Sketcher.sketch_io` (what the index workers call), stored and searched
   through a Flat index (`write_sketch_shard` + `merge_sketch_shards` + `search_index`), and checked
   against the sketches the in-process build stored; query sketches from `Sketcher.sketch_gradients` on
   `Scorer.query_gradients`.
5. Profile of one worker's calls (one thread, CPU time per stage) for the current `sketch_io` and for
   proposed patches (timed copies inside this script, checked to give the same sketches).

    python benchmarks/index_build.py            # default: 8-12 min on a busy 2-core machine
    python benchmarks/index_build.py --quick    # tiny sizes: 2-4 min, mostly Ray and interpreter start-up

Writes `benchmarks/results/index_build.json` (`index_build_quick.json` with --quick; or `--out`) and
prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from indexes.build import SketchBatches  # noqa: E402
from indexes.search import search_index  # noqa: E402
from indexes.shards import write_sketch_shard  # noqa: E402
from indexes.store import load_index, merge_sketch_shards  # noqa: E402
from influence.arguments import CorpusArgs, FactorArgs, IndexArgs, ScoreArgs  # noqa: E402
from influence.artifacts import write_json, write_parquet  # noqa: E402
from jobs.demo.chatterbot import chatterbot_documents  # noqa: E402
from influence.corpus import load_sequences, prepare_corpus  # noqa: E402
from influence.errors import InfluenceError  # noqa: E402
from influence.factors import fit_factors, shard_rows  # noqa: E402
from influence.gradients import capture_module_io, make_token_batch, rotated_gradients, sequence_gradients, summed_token_loss  # noqa: E402
from influence.models import find_tracked_modules, load_model, load_tokenizer  # noqa: E402
from influence.preconditioner import whiten  # noqa: E402
from influence.queries import Query, tokenize_query  # noqa: E402
from influence.scores import Scorer, compute_scores  # noqa: E402
from influence.sketches import Sketcher  # noqa: E402
from influence import tiny  # noqa: E402

LOG = logging.getLogger("benchmarks.index_build")
RESULTS = ROOT / "benchmarks" / "results"
SETUP_VERSION = 1  # bump when the setup code changes the cached model, corpora or factors
LOG_DIR_ENV = "INDEX_BENCH_LOG_DIR"

RUNS = {  # name -> (child kind, its settings)
    "bare x1 (2 threads)": ("bare", {"processes": 1, "threads": 2}),
    "ray job (2 workers)": ("ray", {}),
    "bare x2 (1 thread each)": ("bare", {"processes": 2, "threads": 1}),
    "in-process build_index": ("inprocess", {}),
    "ray job, 128-row blocks (patched)": ("ray", {"block_rows": 128}),
}
BARE_X1, RAY_RUN, BARE_X2, INPROCESS, RAY_SMALL_BLOCKS = RUNS


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a run. Fields in `RUNTIME` do not change the cached setup."""

    num_docs: int = 1000             # N: documents of the small corpus (also the fidelity corpus and the fit corpus)
    scale: int = 4                   # the large corpus holds scale x N documents
    num_queries: int = 16
    vocab_size: int = 1024
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    context: int = 128
    train_steps: int = 300
    train_batch: int = 16
    lr: float = 3e-3
    seed: int = 0
    batch_size: int = 8              # sequences per forward/backward pass, everywhere
    workers: int = 2
    sketch_size: int = 16            # results/index_build.json: k = 16 with the Kronecker sketch, the defaults then (now SRHT, k = 32)
    sketch_sizes: tuple = (4, 8, 16, 32, 64)
    sketch_methods: tuple = ("eigen", "kronecker")  # the Sketcher's methods compared (IndexArgs.sketch)
    dense_max_k: int = 32            # the dense Gaussian baseline is skipped above this k (its matrix grows as k^2 D)
    ivfpq_factory: str = "IVF64,PQ64"
    profile_rows: int = 256
    large_corpus_runs: tuple = (BARE_X1, RAY_RUN, BARE_X2, RAY_SMALL_BLOCKS)
    small_corpus_runs: tuple = (RAY_RUN, BARE_X2, INPROCESS, RAY_SMALL_BLOCKS)  # in-process only here: 2 threads crawl under load
    bare_max_seconds: float = 20.0   # the 2-thread bare loop stops after this much time in calls
    inprocess_threads: int = 2       # torch's default on this machine: what a user of build_index gets

    RUNTIME = ("sketch_methods", "large_corpus_runs", "small_corpus_runs", "bare_max_seconds", "inprocess_threads", "workers", "sketch_sizes", "dense_max_k", "ivfpq_factory", "profile_rows", "batch_size", "num_queries", "sketch_size")

    @property
    def large_docs(self) -> int:
        return self.scale * self.num_docs

    def setup_key(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME}
        fields.update(version=SETUP_VERSION, torch=torch.__version__, chatterbot=_version("chatterbot-corpus"))
        return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=6).hexdigest()


DEFAULT = Settings()
QUICK = Settings(num_docs=96, num_queries=3, vocab_size=300, hidden=16, layers=2, heads=2, intermediate=32, context=48,
                 train_steps=20, sketch_sizes=(4, 8, 16), dense_max_k=16, ivfpq_factory="IVF4,PQ16", profile_rows=64,
                 large_corpus_runs=(RAY_RUN, BARE_X2), small_corpus_runs=(BARE_X1, RAY_RUN, INPROCESS), bare_max_seconds=5.0,
                 inprocess_threads=1)


@dataclasses.dataclass
class Setup:
    dir: Path
    model_dir: Path
    factors_dir: Path
    corpus_dirs: dict          # "N" / "4N" -> corpus directory
    queries: list
    trained: dict              # training.json, or {"trained": False}


# --------------------------------------------------------------------------- setup


def _first_exchange(text: str) -> Optional[tuple[str, str]]:
    if not text.startswith("User: ") or "\nAssistant: " not in text:
        return None
    user, rest = text[len("User: "):].split("\nAssistant: ", 1)
    answer = rest.split("\nUser: ", 1)[0]
    if not user.strip() or not answer.strip():
        return None
    return f"User: {user}\nAssistant:", f" {answer}"


def prepare_setup(settings: Settings, cache_dir: Path) -> Setup:
    """Documents, tokenizer, trained model, both corpora and the factors; reused when on disk."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    documents = chatterbot_documents(None)
    order = np.random.default_rng(settings.seed).permutation(documents.num_rows)
    if settings.large_docs >= documents.num_rows:
        raise InfluenceError(f"{settings.large_docs} documents asked for, chatterbot-corpus has {documents.num_rows}")
    large, held_out = order[: settings.large_docs], order[settings.large_docs:]
    corpus_dirs = {}
    for label, rows in (("N", large[: settings.num_docs]), (f"{settings.scale}N", large)):
        write_parquet(cache_dir / f"documents_{label}.parquet", documents.take(np.sort(rows)))
    model_dir = cache_dir / "model"
    if not (model_dir / "config.json").exists():
        tokenizer = tiny.build_tokenizer(documents.take(np.sort(large))["text"].to_pylist(), vocab_size=settings.vocab_size)
        tmp = cache_dir / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tiny.build_model(tmp, tokenizer, "llama", seed=settings.seed, hidden=settings.hidden, layers=settings.layers,
                         heads=settings.heads, intermediate=settings.intermediate, context=settings.context)
        if hasattr(tiny, "train_model"):  # trained in the temporary directory, renamed only when done
            shutil.rmtree(cache_dir / ".train_corpus", ignore_errors=True)
            corpus_tmp = prepare_corpus(cache_dir / f"documents_{settings.scale}N.parquet", tmp, cache_dir / ".train_corpus",
                                        CorpusArgs(max_length=settings.context), progress=False)
            sequences = load_sequences(corpus_tmp)[0]["input_ids"].to_pylist()
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # reproducible, and fast on a busy 2-core machine
            try:
                tiny.train_model(tmp, sequences, steps=settings.train_steps, lr=settings.lr, batch_size=settings.train_batch,
                                 seed=settings.seed, progress=False)
            finally:
                torch.set_num_threads(threads)
            shutil.rmtree(corpus_tmp, ignore_errors=True)
        tmp.rename(model_dir)
    for label in ("N", f"{settings.scale}N"):
        corpus_dirs[label] = prepare_corpus(cache_dir / f"documents_{label}.parquet", model_dir, cache_dir / f"corpus_{label}",
                                            CorpusArgs(max_length=settings.context), progress=False)
    factors_dir = fit_factors(model_dir, corpus_dirs["N"], cache_dir / "factors",
                              FactorArgs(progress=False, batch_size=settings.batch_size))  # one thread: see main()
    tokenizer = load_tokenizer(model_dir)
    texts, doc_ids = documents["text"].to_pylist(), documents["doc_id"].to_pylist()
    queries = []
    for row in held_out.tolist():
        exchange = _first_exchange(texts[row]) if doc_ids[row].startswith("english/") else None
        if exchange is None:
            continue
        query = Query(f"q{len(queries)}:{doc_ids[row]}", *exchange, "en")
        try:
            tokenize_query(query, tokenizer, settings.context)
        except InfluenceError:
            continue
        queries.append(query)
        if len(queries) == settings.num_queries:
            break
    training = model_dir / "training.json"
    trained = json.loads(training.read_text()) if training.exists() else {"trained": False}
    return Setup(cache_dir, model_dir, factors_dir, corpus_dirs, queries, trained)


# --------------------------------------------------------------------------- timed worker (runs inside Ray actors too)


class TimedSketchBatches(SketchBatches):
    """`SketchBatches` that logs its start-up and every call (wall times, rows, tokens, time in sketch_io).

    Each process appends JSON lines to `$INDEX_BENCH_LOG_DIR/worker-<pid>.jsonl`.
    """

    def __init__(self, model_dir: str, factors_dir: str, args: IndexArgs):
        started = time.time()
        super().__init__(model_dir, factors_dir, args)
        self._log = Path(os.environ[LOG_DIR_ENV]) / f"worker-{os.getpid()}.jsonl"
        self._sketch_seconds = 0.0
        sketch_io = self.sketcher.sketch_io

        def timed_sketch_io(io):
            start = time.perf_counter()
            try:
                return sketch_io(io)
            finally:
                self._sketch_seconds += time.perf_counter() - start

        self.sketcher.sketch_io = timed_sketch_io
        self._write({"event": "init", "start": started, "end": time.time(), "threads": torch.get_num_threads()})

    def __call__(self, batch: dict) -> dict:
        """One logged call per 4 x batch_size rows: Ray sends exactly that many; build_index a whole shard."""
        size = 4 * self.args.batch_size
        if len(batch["seq_id"]) <= size:
            return self._timed_call(batch)
        parts = [self._timed_call({key: value[i: i + size] for key, value in batch.items()}) for i in range(0, len(batch["seq_id"]), size)]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def _timed_call(self, batch: dict) -> dict:
        start, cpu, self._sketch_seconds = time.time(), time.process_time(), 0.0
        lengths = [len(ids) for ids in batch["input_ids"]]
        output = super().__call__(batch)
        padded = sum(len(chunk) * max(chunk) for chunk in _chunks(lengths, self.args.batch_size))
        self._write({"event": "call", "start": start, "end": time.time(), "cpu_seconds": time.process_time() - cpu, "rows": len(lengths),
                     "tokens": sum(lengths), "padded_tokens": padded, "sketch_seconds": self._sketch_seconds})
        return output

    def _write(self, record: dict) -> None:
        with self._log.open("a") as handle:
            handle.write(json.dumps({"pid": os.getpid(), **record}) + "\n")


def _chunks(values: list, size: int) -> list:
    return [values[i: i + size] for i in range(0, len(values), size)]


def read_worker_logs(log_dir: Path) -> dict[int, list[dict]]:
    logs: dict[int, list[dict]] = {}
    for path in sorted(log_dir.glob("worker-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            logs.setdefault(record["pid"], []).append(record)
    return logs


def steady_state(calls_by_worker: dict[int, list[dict]]) -> dict:
    """Rates excluding each worker's first call: sum over workers of rows / (last end - first call's end).

    Also the busy fraction: time inside calls / wall time between them (the rest is Ray Data's overhead
    or waiting for input), and the share of call time spent in `Sketcher.sketch_io`.
    """
    rows = tokens = rate_rows = rate_tokens = busy = span_total = sketch = inside = padded = cpu = steady_rows = 0.0
    for calls in calls_by_worker.values():
        calls = sorted(calls, key=lambda c: c["start"])
        rows += sum(c["rows"] for c in calls)
        tokens += sum(c["tokens"] for c in calls)
        padded += sum(c["padded_tokens"] for c in calls)
        sketch += sum(c["sketch_seconds"] for c in calls)
        inside += sum(c["end"] - c["start"] for c in calls)
        if len(calls) < 2:
            continue
        span = calls[-1]["end"] - calls[0]["end"]
        rate_rows += sum(c["rows"] for c in calls[1:]) / span
        rate_tokens += sum(c["tokens"] for c in calls[1:]) / span
        busy += sum(c["end"] - c["start"] for c in calls[1:])
        cpu += sum(c["cpu_seconds"] for c in calls[1:])
        steady_rows += sum(c["rows"] for c in calls[1:])
        span_total += span
    return {"sequences_per_s": rate_rows, "tokens_per_s": rate_tokens, "busy_fraction": busy / span_total if span_total else None,
            "sketch_io_share_of_calls": sketch / inside if inside else None, "padding_efficiency": tokens / padded if padded else None,
            # CPU time is what background load does not inflate: the fairest cost per sequence
            "cpu_ms_per_sequence": 1000 * cpu / steady_rows if steady_rows else None,
            "cpu_utilisation_in_calls": cpu / busy if busy else None,
            "rows": int(rows), "calls": sum(len(c) for c in calls_by_worker.values()), "workers_seen": len(calls_by_worker),
            "rows_per_worker": sorted((sum(c["rows"] for c in calls) for calls in calls_by_worker.values()), reverse=True)}


# --------------------------------------------------------------------------- memory


class PeakRSS:
    """Polls the RSS of this process's descendants in a background thread; keeps each one's peak."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.psutil, self.interval, self.peaks, self.names, self.cpu = psutil, interval, {}, {}, {}
        self.self_peak = (0, 0.0)  # (RSS of this process, when)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = self.psutil.Process()
        while not self._stop.is_set():
            rss = me.memory_info().rss
            if rss > self.self_peak[0]:
                self.self_peak = (rss, time.time())
            try:
                children = me.children(recursive=True)
            except self.psutil.Error:
                children = []
            for proc in children:
                try:
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                    self.cpu[proc.pid] = times.user + times.system
                    # Ray workers retitle themselves once they hold an actor: keep the latest title
                    self.names[proc.pid] = " ".join(proc.cmdline())[:120] or proc.name()
                except self.psutil.Error:
                    continue
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
            self._stop.wait(self.interval)

    def is_worker(self, pid: int) -> bool:
        return "SketchBatches" in self.names[pid] or "MapWorker" in self.names[pid]

    def summary(self) -> dict:
        workers = [p for pid, p in self.peaks.items() if self.is_worker(pid)]
        cpu = {"workers": sum(c for pid, c in self.cpu.items() if self.is_worker(pid)),
               "other ray processes": sum(c for pid, c in self.cpu.items() if not self.is_worker(pid))}
        return {"worker_peak_rss_mb": _mb(max(workers)) if workers else None, "num_worker_processes": len(workers),
                "cpu_seconds_by_process_group": {k: round(v, 2) for k, v in cpu.items()},
                "all_descendants_peak_sum_mb": _mb(sum(self.peaks.values())),
                "largest_descendants": sorted(({"name": self.names[pid], "peak_rss_mb": _mb(p)} for pid, p in self.peaks.items()),
                                              key=lambda r: -r["peak_rss_mb"])[:6]}


def _children_cpu() -> float:
    """User + system CPU seconds of every descendant that has exited and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _mb(num_bytes: float) -> float:
    return round(num_bytes / 2**20, 1)


def driver_peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: on Linux a fork+exec'd child inherits the
    forking parent's maxrss, so every child of a 700 MB benchmark would report at least 700 MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --------------------------------------------------------------------------- children (one fresh process each)


def child_ray(spec: dict) -> dict:
    """run_index_job on an embedded cluster, with the timed worker, a timed cluster start and a timed merge."""
    import jobs.index as job
    from jobs.cluster import WORKER_ENV

    log_dir = Path(spec["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ[LOG_DIR_ENV] = WORKER_ENV[LOG_DIR_ENV] = str(log_dir)  # the workers' runtime env, in this process only
    marks: dict[str, float] = {}
    real_cluster, real_finish = job.ray_cluster, job.finish_index

    from contextlib import contextmanager

    @contextmanager
    def timed_cluster(address=None):
        marks["cluster_start"] = time.time()
        with real_cluster(address):
            marks["cluster_ready"] = time.time()
            yield
            marks["cluster_shutdown"] = time.time()
        marks["cluster_down"] = time.time()

    def timed_finish(*args, **kwargs):
        marks["merge_start"] = time.time()
        try:
            return real_finish(*args, **kwargs)
        finally:
            marks["merge_end"] = time.time()

    job.ray_cluster, job.finish_index, job.SketchBatches = timed_cluster, timed_finish, TimedSketchBatches
    if spec.get("block_rows"):
        # The proposed change to jobs/index.py, applied here: hand Ray Data blocks of `block_rows` rows
        # instead of one block per shard. Ray Data gives each actor whole blocks, so with a few large blocks one
        # actor can end up with all the work while the other idles.
        import ray.data

        real_from_arrow, size = ray.data.from_arrow, spec["block_rows"]

        def from_arrow_in_small_blocks(tables, **kwargs):
            tables = tables if isinstance(tables, list) else [tables]
            return real_from_arrow([t.slice(i, size) for t in tables for i in range(0, t.num_rows, size)], **kwargs)

        ray.data.from_arrow = from_arrow_in_small_blocks
    args = IndexArgs(sketch_size=spec["sketch_size"], batch_size=spec["batch_size"], workers=spec["workers"], progress=False)
    with PeakRSS() as monitor:
        start, cpu = time.time(), time.process_time()  # this interpreter's imports are not counted; a bare child's are
        job.run_index_job(spec["model_dir"], spec["factors_dir"], spec["corpus_dir"], spec["index_dir"], args)
        end, driver_cpu = time.time(), time.process_time() - cpu
    logs = read_worker_logs(log_dir)
    calls = {pid: [r for r in records if r["event"] == "call"] for pid, records in logs.items()}
    calls = {pid: records for pid, records in calls.items() if records}
    inits = [r for pid in calls for r in logs[pid] if r["event"] == "init"]
    actor_inits = [r for pid, records in logs.items() if pid != os.getpid() for r in records if r["event"] == "init"]
    preflight = [r["end"] - r["start"] for r in logs.get(os.getpid(), []) if r["event"] == "init"]  # the driver's own model load
    first_call = min(c["start"] for cs in calls.values() for c in cs)
    last_call = max(c["end"] for cs in calls.values() for c in cs)
    summary = monitor.summary()
    peak_rss, peak_time = monitor.self_peak
    phase_marks = [("before the cluster", start), ("cluster start", marks["cluster_start"]), ("waiting for the first batch", marks["cluster_ready"]),
                   ("sketching (iter_batches, shard writes)", first_call), ("shutdown", marks["cluster_shutdown"]),
                   ("merge", marks["merge_start"]), ("after the merge", marks["merge_end"])]
    return {
        "driver_rss_peak_phase": {"rss_mb": _mb(peak_rss), "phase": [name for name, t in phase_marks if t <= peak_time][-1]},
        "seconds": end - start,
        "phases": {
            "before_cluster": marks["cluster_start"] - start,
            "driver_preflight_model_load": sum(preflight),
            "cluster_start": marks["cluster_ready"] - marks["cluster_start"],
            "actor_init_max": max(r["end"] - r["start"] for r in inits),
            "until_first_call": first_call - marks["cluster_ready"],
            "calls": last_call - first_call,
            "after_last_call_until_shutdown": marks["cluster_shutdown"] - last_call,
            "cluster_shutdown": marks["cluster_down"] - marks["cluster_shutdown"],
            "merge": marks["merge_end"] - marks["merge_start"],
        },
        "steady": steady_state(calls),
        "actors_with_calls": len(inits),
        # an actor whose model loads after the last batch was sent gets none: it only cost start-up
        "actor_ready_after_cluster_s": sorted(round(r["end"] - marks["cluster_ready"], 2) for r in actor_inits),
        "last_call_end_after_cluster_s": round(last_call - marks["cluster_ready"], 2),
        "worker_threads": sorted({r["threads"] for r in inits}),
        "driver_peak_rss_mb": driver_peak_rss_mb(),
        "driver_cpu_seconds": driver_cpu,
        "reaped_children_cpu_seconds": _children_cpu(),
        **summary,
        # everything the job burnt: driver + Ray's processes (reaped rusage, or psutil's last readings if larger)
        "total_cpu_seconds": driver_cpu + max(_children_cpu(), sum(summary["cpu_seconds_by_process_group"].values())),
    }


def child_inprocess(spec: dict) -> dict:
    """build_index in this process with `threads` torch threads and the timed worker."""
    import indexes.build as build

    torch.set_num_threads(spec["threads"])
    log_dir = Path(spec["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ[LOG_DIR_ENV] = str(log_dir)
    marks: dict[str, float] = {}
    real_finish = build.finish_index

    def timed_finish(*args, **kwargs):
        marks["merge_start"] = time.time()
        try:
            return real_finish(*args, **kwargs)
        finally:
            marks["merge_end"] = time.time()

    build.finish_index = timed_finish
    args = IndexArgs(sketch_size=spec["sketch_size"], batch_size=spec["batch_size"], progress=False)
    start, cpu = time.time(), time.process_time()
    worker = TimedSketchBatches(spec["model_dir"], spec["factors_dir"], args)
    loaded = time.time()
    sequences, _ = load_sequences(spec["corpus_dir"])
    build.build_index(spec["model_dir"], spec["factors_dir"], spec["corpus_dir"], spec["index_dir"], args, worker=worker)
    end = time.time()
    calls = {pid: [r for r in records if r["event"] == "call"] for pid, records in read_worker_logs(log_dir).items()}
    return {"seconds": end - start, "phases": {"model_load": loaded - start, "merge": marks["merge_end"] - marks["merge_start"],
                                               "sketching": marks["merge_start"] - loaded},
            "steady": steady_state(calls), "threads": torch.get_num_threads(), "sequences": sequences.num_rows,
            "driver_peak_rss_mb": driver_peak_rss_mb(), "total_cpu_seconds": time.process_time() - cpu}


def _bare_loop(model_dir: str, corpus_dir: str, rows: Optional[tuple[int, int]], batch_size: int, threads: int,
               max_seconds: float) -> list[dict]:
    """Forward, summed next-token loss, backward over `rows`, logged like the worker's calls (4 batches a call).

    Stops after `max_seconds` of calls: a rate needs no more, and 2 torch threads on a busy 2-core machine
    can be ten times slower than one."""
    torch.set_num_threads(threads)
    started = time.time()
    model = load_model(model_dir)
    sequences, _ = load_sequences(corpus_dir)
    rows = range(*rows) if rows else range(sequences.num_rows)
    ids = sequences["input_ids"].slice(rows.start, len(rows)).to_pylist()
    records = [{"event": "init", "start": started, "end": time.time(), "threads": threads}]
    calls_of = 4 * batch_size
    for offset in range(0, len(ids), calls_of):
        if records[-1]["end"] - records[0]["end"] > max_seconds and len(records) > 3:  # steady state needs >= 2 calls after the first
            break
        start, cpu, call = time.time(), time.process_time(), ids[offset: offset + calls_of]
        for chunk in _chunks(call, batch_size):
            batch = make_token_batch(chunk)
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
            summed_token_loss(logits, batch.labels, batch.label_mask).backward()
        lengths = [len(s) for s in call]
        records.append({"event": "call", "start": start, "end": time.time(), "cpu_seconds": time.process_time() - cpu, "rows": len(call), "tokens": sum(lengths),
                        "padded_tokens": sum(len(c) * max(c) for c in _chunks(lengths, batch_size)), "sketch_seconds": 0.0})
    return records


def _bare_process(args: tuple) -> list[dict]:
    return _bare_loop(*args)


def child_bare(spec: dict) -> dict:
    """The bare loop in this process, or in `processes` spawned processes over contiguous halves."""
    start, cpu = time.time(), time.process_time()
    processes, threads = spec["processes"], spec["threads"]
    if processes == 1:
        results = [_bare_loop(spec["model_dir"], spec["corpus_dir"], None, spec["batch_size"], threads, spec["max_seconds"])]
    else:
        import multiprocessing

        num_rows = load_sequences(spec["corpus_dir"])[0].num_rows
        jobs = [(spec["model_dir"], spec["corpus_dir"], (r.start, r.stop), spec["batch_size"], threads, spec["max_seconds"])
                for r in (shard_rows(num_rows, p, processes) for p in range(processes))]
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = pool.map(_bare_process, jobs)
    end = time.time()
    calls = {p: [r for r in records if r["event"] == "call"] for p, records in enumerate(results)}
    first = min(c["start"] for cs in calls.values() for c in cs)
    return {"seconds": end - start, "rows_done": sum(c["rows"] for cs in calls.values() for c in cs),
            "tokens_done": sum(c["tokens"] for cs in calls.values() for c in cs), "phases": {"until_first_call": first - start, "calls": max(c["end"] for cs in calls.values() for c in cs) - first},
            "steady": steady_state(calls), "processes": processes, "threads": threads, "driver_peak_rss_mb": driver_peak_rss_mb(),
            "total_cpu_seconds": time.process_time() - cpu + _children_cpu()}


CHILDREN: dict[str, Callable[[dict], dict]] = {"ray": child_ray, "inprocess": child_inprocess, "bare": child_bare}


def run_child(kind: str, spec: dict, scratch: Path, timeout: float = 1800) -> dict:
    """Run one measurement in a fresh interpreter; returns its result dict (with load averages around it)."""
    scratch.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = scratch / f"{kind}-{spec['label']}.spec.json", scratch / f"{kind}-{spec['label']}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()[0]
    completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, str(spec_path), str(out_path)],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"child {kind} {spec['label']} failed:\n{completed.stderr[-4000:]}")
    result = json.loads(out_path.read_text())
    result["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


# --------------------------------------------------------------------------- throughput, bytes, memory


def corpus_stats(corpus_dir: Path) -> dict:
    sequences, manifest = load_sequences(corpus_dir)
    return {"documents": manifest["num_documents"], "sequences": sequences.num_rows, "tokens": manifest["num_tokens"]}


def measure_builds(setup: Setup, settings: Settings, scratch: Path) -> dict:
    """Every build and bare loop at both sizes, interleaved so that background load hits all alike."""
    out: dict = {}
    common = {"model_dir": str(setup.model_dir), "factors_dir": str(setup.factors_dir), "batch_size": settings.batch_size,
              "sketch_size": settings.sketch_size, "workers": settings.workers, "threads": settings.inprocess_threads}
    for label, corpus_dir in reversed(setup.corpus_dirs.items()):  # the large corpus first: the headline numbers
        stats = corpus_stats(corpus_dir)
        runs = {}
        names = settings.small_corpus_runs if label == "N" else settings.large_corpus_runs
        for number, name in enumerate(names):
            kind, extra = RUNS[name]
            tag = f"{label}-{number}-{kind}"
            index_dir = scratch / f"{kind}_{label}"
            shutil.rmtree(index_dir, ignore_errors=True)
            LOG.info("corpus %s: %s", label, name)
            capped = kind == "bare" and extra["threads"] > 1  # one-thread loops run the whole corpus, like the builds
            result = run_child(kind, {**common, **extra, "corpus_dir": str(corpus_dir), "index_dir": str(index_dir), "label": tag,
                                      "max_seconds": settings.bare_max_seconds if capped else float("inf"),
                                      "log_dir": str(scratch / f"logs-{tag}")}, scratch)
            done = result.get("rows_done", stats["sequences"]) / stats["sequences"]  # bare loops may stop early
            result["end_to_end"] = {"sequences_per_s": done * stats["sequences"] / result["seconds"],
                                    "documents_per_s": done * stats["documents"] / result["seconds"],
                                    "tokens_per_s": result.get("tokens_done", stats["tokens"]) / result["seconds"],
                                    "fraction_of_corpus": done}
            runs[name] = result
        bares = [n for n in runs if n.startswith("bare")]
        for name, result in runs.items():
            if bares:
                best = {key: max(runs[n][key]["sequences_per_s"] for n in bares) for key in ("end_to_end", "steady")}
                result["ratio_to_best_bare"] = {key: result[key]["sequences_per_s"] / best[key] if best[key] else None for key in best}
            if BARE_X1 in runs:
                result["ratio_to_bare_x1"] = {key: result[key]["sequences_per_s"] / runs[BARE_X1][key]["sequences_per_s"]
                                              if runs[BARE_X1][key]["sequences_per_s"] else None for key in ("end_to_end", "steady")}
        add_cpu_ratios(runs)
        out[label] = {"corpus": stats, "runs": runs}
    return out


def add_cpu_ratios(runs: dict) -> None:
    """CPU-time ratios to the bare x2 loop: what background load does not distort (wall ratios it does)."""
    if BARE_X2 not in runs:
        return
    bare = runs[BARE_X2]
    for result in runs.values():
        steady = result["steady"].get("cpu_ms_per_sequence")
        result["cpu_ratio_to_bare_x2"] = {
            "steady": bare["steady"]["cpu_ms_per_sequence"] / steady if steady else None,
            "end_to_end": (bare["total_cpu_seconds"] / bare["rows_done"]) / (result["total_cpu_seconds"] / result.get("rows_done", result["steady"]["rows"]))}


def decompose(throughput: dict, target: float = 0.7) -> dict:
    """Each run's wall time as fixed + n x marginal, from its own phases (start-up, merge and shutdown vs the
    calls), and the corpus size from which the Ray job's end-to-end rate would reach `target` x the bare x2
    loop's under the same conditions (None: never). Per run, so background load that changes between runs
    does not leak into the slope the way a fit across runs would."""
    out: dict = {}
    for label, entry in throughput.items():
        fits = {}
        for name, run in entry["runs"].items():
            rows = run.get("rows_done", entry["corpus"]["sequences"])
            calls = run["phases"].get("calls", run["phases"].get("sketching", 0.0))
            fits[name] = {"fixed_seconds": run["seconds"] - calls, "marginal_ms_per_sequence": 1000 * calls / rows}
        result: dict = {"fits": fits}
        if RAY_RUN in fits and BARE_X2 in fits:
            ray, bare = fits[RAY_RUN], fits[BARE_X2]
            c_r, c_b = ray["marginal_ms_per_sequence"] / 1000, bare["marginal_ms_per_sequence"] / 1000
            result["ray_asymptotic_ratio_to_bare_x2"] = c_b / c_r
            denominator = c_b - target * c_r
            n = (target * ray["fixed_seconds"] - bare["fixed_seconds"]) / denominator if denominator > 0 else None
            result[f"sequences_for_ratio_{target}"] = max(0.0, n) if n is not None else None
        out[label] = result
    return out


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def measure_bytes(index_dir: Path, settings: Settings, scratch: Path) -> dict:
    """Bytes per document of the Flat index as built, and of the same shards merged with an IVF-PQ factory."""
    from indexes.constants import DOCS_NAME, INDEX_META_NAME, INDEX_NAME, SKETCH_SHARD_NAME

    meta = json.loads((index_dir / INDEX_META_NAME).read_text())
    n = meta["ntotal"]
    shards = [p for p in index_dir.iterdir() if p.is_dir() and p.name.startswith(SKETCH_SHARD_NAME.split("{")[0])]
    result = {"sequences": n, "dim": meta["dim"], "sketch_size": settings.sketch_size, "sketch": IndexArgs().sketch}
    copy = scratch / "ivfpq"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for shard in shards:
        shutil.copytree(shard, copy / shard.name)
    start = time.perf_counter()
    merge_sketch_shards(copy, meta["num_shards"], factory=settings.ivfpq_factory, train_size=50_000, seed=0, progress=False)
    ivfpq_seconds = time.perf_counter() - start
    for factory, directory in (("Flat", index_dir), (settings.ivfpq_factory, copy)):
        entry = {"index.faiss": (directory / INDEX_NAME).stat().st_size, "docs.parquet": (directory / DOCS_NAME).stat().st_size,
                 "shards": sum(directory_bytes(s) for s in shards)}
        result[factory] = {f"{key}_bytes_per_sequence": value / n for key, value in entry.items()}
        result[factory]["total_bytes_per_sequence"] = sum(entry.values()) / n
    result[settings.ivfpq_factory]["merge_seconds"] = ivfpq_seconds
    import faiss

    ivf = faiss.extract_index_ivf(load_index(copy, mmap=False))
    per_row = ivf.code_size + 8  # a PQ code and an int64 id in the inverted lists
    result[settings.ivfpq_factory]["index.faiss_per_row_bytes"] = per_row
    result[settings.ivfpq_factory]["index.faiss_fixed_bytes"] = (copy / INDEX_NAME).stat().st_size - per_row * n  # centroids, codebooks
    result["raw_float32_sketch_bytes"] = 4 * meta["dim"]
    return result


# --------------------------------------------------------------------------- fidelity


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def fidelity_metrics(approx: np.ndarray, exact: np.ndarray, depths=(10, 50, 100)) -> dict:
    """Per-query Pearson/Spearman and recall of the exact top-10 within the approximate top-m, averaged."""
    pearson = [float(np.corrcoef(a, e)[0, 1]) for a, e in zip(approx, exact)]
    spear = [spearman(a, e) for a, e in zip(approx, exact)]
    out = {"pearson": float(np.mean(pearson)), "pearson_min": float(np.min(pearson)), "pearson_sem": _sem(pearson),
           "spearman": float(np.mean(spear)), "spearman_min": float(np.min(spear))}
    for depth in depths:
        recalls = []
        for a, e in zip(approx, exact):
            top_exact = set(np.argsort(-e)[:10].tolist())
            recalls.append(len(top_exact & set(np.argsort(-a)[:depth].tolist())) / 10)
        out[f"recall10@{depth}"] = float(np.mean(recalls))
        out[f"recall10@{depth}_sem"] = _sem(recalls)
    return out


def _sem(values: list) -> float:
    """Standard error of the mean over queries."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def dense_projection(whitened: np.ndarray, queries: np.ndarray, dim: int, seed: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Project rows of (n, D) and (q, D) by one dense N(0, 1/dim) matrix (D, dim), generated in row blocks."""
    generator = torch.Generator().manual_seed(seed)
    docs = torch.zeros(whitened.shape[0], dim)
    qs = torch.zeros(queries.shape[0], dim)
    for start in range(0, whitened.shape[1], block):
        stop = min(start + block, whitened.shape[1])
        matrix = torch.randn(stop - start, dim, generator=generator) / math.sqrt(dim)  # (block, dim)
        docs += torch.from_numpy(whitened[:, start:stop]) @ matrix
        qs += torch.from_numpy(queries[:, start:stop]) @ matrix
    return docs.numpy(), qs.numpy()


def fast_walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of the rows of (n, P), P a power of two: P log2 P additions."""
    n, size = x.shape
    h = 1
    while h < size:
        pairs = x.view(n, size // (2 * h), 2, h)  # element i pairs with i + h inside blocks of 2h
        x = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2).view(n, size)
        h *= 2
    return x


def srht_transform(whitened: np.ndarray, queries: np.ndarray, modules: list, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per module, H D x of the documents and queries (D: random signs, H: Walsh-Hadamard over the module's
    block, zero-padded to a power of two) and a random order of its coordinates. Sketching to m coordinates
    then keeps the first m of that order, scaled by 1/sqrt(m): a subsampled randomised Hadamard transform
    (SRHT), whose inner products are unbiased. Storage: D signs and m indices per module, no D x m matrix;
    cost per sequence: D log2 D additions."""
    generator = torch.Generator().manual_seed(seed)
    out, offset = [], 0
    for m in modules:
        width = m.shape[0] * m.shape[1]
        size = 1 << (width - 1).bit_length()
        signs = torch.randint(0, 2, (width,), generator=generator).float() * 2 - 1
        order = torch.randperm(size, generator=generator)
        transformed = []
        for source in (whitened, queries):
            x = torch.zeros(source.shape[0], size)
            x[:, :width] = torch.from_numpy(source[:, offset: offset + width]) * signs
            transformed.append(fast_walsh_hadamard(x))
        out.append((transformed[0], transformed[1], order))
        offset += width
    return out


def srht_sketches(transforms: list, dims: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """SRHT sketches with `dims[i]` coordinates of module i, from `srht_transform`'s output."""
    docs = [t_docs[:, order[:dim]] / math.sqrt(dim) for (t_docs, _, order), dim in zip(transforms, dims)]
    queries = [t_queries[:, order[:dim]] / math.sqrt(dim) for (_, t_queries, order), dim in zip(transforms, dims)]
    return torch.cat(docs, 1).numpy(), torch.cat(queries, 1).numpy()


def measure_fidelity(setup: Setup, settings: Settings, scratch: Path, stored_index: Optional[Path]) -> dict:
    """Sketch inner products vs exact EK-FAC scores on corpus N: Kronecker vs dense Gaussian vs SRHT projections."""
    torch.set_num_threads(1)  # many small ops: one thread is the fastest on a busy 2-core machine
    corpus_dir = setup.corpus_dirs["N"]
    start = time.perf_counter()
    exact = compute_scores(setup.model_dir, setup.factors_dir, corpus_dir, setup.queries,
                           ScoreArgs(per_module=False, progress=False, batch_size=settings.batch_size)).scores  # (q, n)
    exact_seconds = time.perf_counter() - start

    scorer = Scorer(setup.model_dir, setup.factors_dir, ScoreArgs(progress=False))
    factors, modules = scorer.factors, scorer.modules
    methods = settings.sketch_methods
    sketchers = {(method, k): Sketcher(factors, modules, k, seed=0, method=method) for method in methods for k in settings.sketch_sizes}
    query_grads = scorer.query_gradients(scorer.tokenize(setup.queries))
    query_whitened = torch.cat([whiten(query_grads[m.name], factors.modules[m.name]).flatten(1) for m in modules], 1).numpy()

    sequences, _ = load_sequences(corpus_dir)
    ids = sequences["input_ids"].to_pylist()
    total_dim = sum(m.shape[0] * m.shape[1] for m in modules)
    whitened_docs = np.zeros((len(ids), total_dim), np.float32)  # (n, D): the full whitened gradients, for the split check and the baselines
    doc_sketches = {key: [] for key in sketchers}
    start = time.perf_counter()
    with torch.no_grad():
        for offset in range(0, len(ids), settings.batch_size):
            batch = make_token_batch(ids[offset: offset + settings.batch_size])
            io, _ = capture_module_io(scorer.model, modules, batch)
            for key, sketcher in sketchers.items():
                doc_sketches[key].append(sketcher.sketch_io(io).sketches.numpy())
            parts = [whiten(sequence_gradients(*io[m.name]), factors.modules[m.name]).flatten(1) for m in modules]
            whitened_docs[offset: offset + len(batch.input_ids)] = torch.cat(parts, 1).numpy()
    sketch_seconds = time.perf_counter() - start

    split = query_whitened.astype(np.float64) @ whitened_docs.T.astype(np.float64)  # (q, n) = exact scores, if the split holds
    result = {"corpus": corpus_stats(corpus_dir), "num_queries": len(setup.queries), "exact_seconds": exact_seconds,
              "sketch_pass_seconds": sketch_seconds, "whitened_dim": total_dim, "methods": [*methods, "srht", "dense_gaussian"],
              "split_check_max_rel_error": float(np.abs(split - exact).max() / np.abs(exact).max()),
              "unprojected": fidelity_metrics(split, exact), **{method: {} for method in methods}, "dense_gaussian": {}, "srht": {}}
    start = time.perf_counter()
    transforms = srht_transform(whitened_docs, query_whitened, modules, seed=0)
    result["srht_transform_seconds"] = time.perf_counter() - start
    default_method = IndexArgs().sketch
    for (method, k), sketcher in sketchers.items():
        sketches = np.concatenate(doc_sketches[(method, k)])
        # stored and searched through the index's own code path: one shard, merged into a Flat index
        index_dir = scratch / f"fidelity_{method}_k{k}"
        shutil.rmtree(index_dir, ignore_errors=True)
        write_sketch_shard(index_dir, 0, 1, sketches, pa.table({"seq_id": sequences["seq_id"]}))
        merge_sketch_shards(index_dir, 1, factory="Flat", progress=False)
        query_sketch = sketcher.sketch_gradients(query_grads).numpy()
        scores, found = search_index(load_index(index_dir), query_sketch, k=len(ids))
        approx = np.empty_like(exact)
        for row in range(len(found)):
            approx[row, found[row]] = scores[row]
        entry = {"dim": sketcher.dim, **fidelity_metrics(approx, exact),
                 "index_faiss_bytes_per_sequence": (index_dir / "index.faiss").stat().st_size / len(ids),
                 "stored_floats": sum(r_out.numel() + r_in.numel() for r_out, r_in in sketcher.projections.values())
                 + sum(c.numel() for c in sketcher.coordinates.values())}
        if method == "kronecker":
            entry["projection_flops_per_sequence"] = sum(2 * r_out.shape[0] * m.shape[0] * m.shape[1] + 2 * r_out.shape[0] * m.shape[1] * r_in.shape[0]
                                                         for m, (r_out, r_in) in zip(modules, sketcher.projections.values()))
        else:
            entry["projection_flops_per_sequence"] = 0  # a gather
        if method == default_method and k == settings.sketch_size and stored_index is not None:
            # the same numbers as the index job stored: the fidelity measured here is the index's
            stored = np.concatenate([np.load(p / "sketches.npy") for p in sorted(stored_index.glob("sketch_shard_*"))])
            entry["max_abs_diff_vs_built_index"] = float(np.abs(stored - sketches).max()) if stored.shape == sketches.shape else None
        result[method][str(k)] = entry
    for k in settings.sketch_sizes:
        widths = [m.shape[0] * m.shape[1] for m in modules]
        dims = [min(k, m.shape[0]) * min(k, m.shape[1]) for m in modules]  # what the Kronecker sketch keeps per module
        dim = sum(dims)
        srht_docs, srht_queries = srht_sketches(transforms, dims)
        result["srht"][str(k)] = {
            "dim": dim, **fidelity_metrics(srht_queries.astype(np.float64) @ srht_docs.T.astype(np.float64), exact),
            "stored_floats": sum(widths) + dim,
            "projection_flops_per_sequence": sum((1 << (w - 1).bit_length()) * (w - 1).bit_length() for w in widths)}
        if k <= settings.dense_max_k:
            start = time.perf_counter()
            torch.set_num_threads(2)  # large GEMMs do use both cores
            dense_docs, dense_queries = dense_projection(whitened_docs, query_whitened, dim, seed=k)
            torch.set_num_threads(1)
            result["dense_gaussian"][str(k)] = {
                "dim": dim, **fidelity_metrics(dense_queries.astype(np.float64) @ dense_docs.T.astype(np.float64), exact),
                "stored_floats": total_dim * dim, "projection_flops_per_sequence": 2 * total_dim * dim,
                "seconds": time.perf_counter() - start}
        else:
            result["dense_gaussian"][str(k)] = {"dim": dim, "skipped": f"a dense {total_dim} x {dim} matrix is {total_dim * dim * 4 / 2**30:.1f} GiB "
                                                                    f"and {2 * total_dim * dim / 1e9:.1f} GFLOP per sequence"}
    return result


# --------------------------------------------------------------------------- profile of one worker call


def sketch_io_staged(sketcher: Sketcher, io: dict, timer: dict) -> tuple:
    """A copy of `Sketcher.sketch_io` (current code) with a timer around each stage."""
    parts, self_influence, squared_norm = [], 0.0, 0.0
    for m in sketcher.modules:
        a, s = io[m.name]
        f = sketcher.factors.modules[m.name]
        with _stage(timer, "rotate (Q_S^T G Q_A)"):
            rotated = rotated_gradients(a, s, f.q_a, f.q_s)
        with _stage(timer, "whiten"):
            whitened = sketcher.whiten(m.name, rotated)
        with _stage(timer, "project (Sketcher.project)"):
            parts.append(sketcher.project(m.name, whitened))
        with _stage(timer, "self-influence"):
            self_influence = self_influence + whitened.double().pow(2).sum((1, 2))
        with _stage(timer, "gradient norm (re-forms G)"):
            squared_norm = squared_norm + sequence_gradients(a, s).double().pow(2).sum((1, 2))
    with _stage(timer, "concatenate"):
        sketches = torch.cat(parts, dim=1).float()
    return sketches, self_influence, squared_norm.sqrt()


def sketch_io_patched(sketcher: Sketcher, io: dict, inverse_sqrt: dict, timer: dict) -> tuple:
    """Proposed `sketch_io`: ||G||_F from the rotated gradient (Q_A, Q_S are orthogonal, so the norm is
    unchanged: no second einsum over tokens), whitening by a precomputed (Lambda + lambda)^-1/2, and
    float64 sums without a float64 copy of the whole (batch, d_out, d_in) tensor."""
    parts, self_influence, squared_norm = [], 0.0, 0.0
    for m in sketcher.modules:
        a, s = io[m.name]
        f = sketcher.factors.modules[m.name]
        with _stage(timer, "rotate (Q_S^T G Q_A)"):
            rotated = rotated_gradients(a, s, f.q_a, f.q_s)
        with _stage(timer, "gradient norm (from rotated)"):
            squared_norm = squared_norm + (rotated * rotated).sum((1, 2), dtype=torch.float64)
        with _stage(timer, "whiten"):
            whitened = rotated * inverse_sqrt[m.name]
        with _stage(timer, "project (Sketcher.project)"):
            parts.append(sketcher.project(m.name, whitened))
        with _stage(timer, "self-influence"):
            self_influence = self_influence + (whitened * whitened).sum((1, 2), dtype=torch.float64)
    with _stage(timer, "concatenate"):
        sketches = torch.cat(parts, dim=1).float()
    return sketches, self_influence, squared_norm.sqrt()


class _stage:
    """Adds the CPU time of a block to timer[name]: with one torch thread, CPU time is the work done, which
    background load on the machine does not inflate (wall time it does, by 2x and more here)."""

    def __init__(self, timer: dict, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.start = time.process_time()

    def __exit__(self, *exc):
        self.timer[self.name] = self.timer.get(self.name, 0.0) + time.process_time() - self.start


PROFILE_VARIANTS = ("current", "current, the other sketch", "patched", "patched + length-sorted calls")


def profile_worker(setup: Setup, settings: Settings) -> dict:
    """Where one worker's time goes (one torch thread, like a Ray worker), and what the patches save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker = SketchBatches(str(setup.model_dir), str(setup.factors_dir),
                               IndexArgs(sketch_size=settings.sketch_size, batch_size=settings.batch_size, progress=False))
        sketcher, model, modules = worker.sketcher, worker.model, worker.modules
        other = Sketcher(sketcher.factors, modules, settings.sketch_size, seed=0,
                         method=next(m for m in settings.sketch_methods if m != sketcher.method))
        inverse_sqrt = {name: (f.eigenvalues + f.damping).rsqrt() for name, f in sketcher.factors.modules.items()}
        sequences, _ = load_sequences(setup.corpus_dirs["N"])
        ids = sequences["input_ids"].slice(0, settings.profile_rows).to_pylist()
        call_rows = 4 * settings.batch_size

        def batches(sort: bool):
            for offset in range(0, len(ids), call_rows):
                call = ids[offset: offset + call_rows]
                order = sorted(range(len(call)), key=lambda i: len(call[i])) if sort else list(range(len(call)))
                for chunk in _chunks(order, settings.batch_size):
                    yield make_token_batch([call[i] for i in chunk])

        def run_variant(variant: str) -> dict:
            timer: dict = {}
            outputs = []
            for batch in batches(sort=variant == "patched + length-sorted calls"):
                with _stage(timer, "forward + backward (capture_module_io)"):
                    io, _ = capture_module_io(model, modules, batch)
                if variant == "current":
                    outputs.append(sketch_io_staged(sketcher, io, timer))
                elif variant == "current, the other sketch":
                    outputs.append(sketch_io_staged(other, io, timer))
                else:
                    outputs.append(sketch_io_patched(sketcher, io, inverse_sqrt, timer))
            return {"timer": timer, "outputs": outputs}

        def run_bare() -> dict:
            timer: dict = {}
            for batch in batches(sort=False):
                with _stage(timer, "forward + backward (bare, loss.backward)"):
                    model.zero_grad(set_to_none=True)
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
                    summed_token_loss(logits, batch.labels, batch.label_mask).backward()
            model.zero_grad(set_to_none=True)
            return {"timer": timer}

        variants = PROFILE_VARIANTS
        best: dict = {}
        for _ in range(3):  # interleaved repeats; the minimum of each stage resists what noise remains
            for name, fn in [("bare", run_bare)] + [(v, (lambda v=v: run_variant(v))) for v in variants]:
                run = fn()
                if name in best:
                    best[name]["timer"] = {k: min(v, best[name]["timer"][k]) for k, v in run["timer"].items()}
                else:
                    best[name] = run
        # the staged copy must be the real thing, and the patch must not change the result
        reference = [sketcher.sketch_io(capture_module_io(model, modules, b)[0]) for b in batches(sort=False)]
        current = best["current"]["outputs"]
        patched = best["patched"]["outputs"]
        check = {
            "staged_copy_equals_sketch_io": all(torch.equal(r.sketches, c[0]) for r, c in zip(reference, current)),
            "patched_max_abs_diff_sketch": max(float((r.sketches - p[0]).abs().max()) for r, p in zip(reference, patched)),
            "patched_max_rel_diff_self_influence": max(float(((r.self_influence - p[1]).abs() / r.self_influence.abs()).max()) for r, p in zip(reference, patched)),
            "patched_max_rel_diff_grad_norm": max(float(((r.gradient_norm - p[2]).abs() / r.gradient_norm.abs()).max()) for r, p in zip(reference, patched)),
        }
        padded = {sort: sum(int(b.input_ids.numel()) for b in batches(sort)) for sort in (False, True)}
        real = sum(len(s) for s in ids)
        bare_seconds = sum(best["bare"]["timer"].values())
        lengths = [len(s) for s in sequences["input_ids"].to_pylist()]  # the whole corpus N, for larger calls
        by_call = {}
        for call in (4 * settings.batch_size, 16 * settings.batch_size, 64 * settings.batch_size):
            padded_tokens = sum(len(chunk) * max(chunk) for start in range(0, len(lengths), call)
                                for chunk in _chunks(sorted(lengths[start: start + call]), settings.batch_size))
            by_call[f"sorted_within_{call}_rows"] = sum(lengths) / padded_tokens
        result = {"rows": len(ids), "threads": 1, "sketch": sketcher.method, "other_sketch": other.method, "timer": "CPU seconds (time.process_time), minimum of 3 interleaved repeats",
                  "bare_seconds": bare_seconds, "checks": check,
                  "padding_efficiency": {"as_is": real / padded[False], "length_sorted_within_call": real / padded[True],
                                         "corpus_N_as_is": sum(lengths) / sum(len(c) * max(c) for c in _chunks(lengths, settings.batch_size)),
                                         **{f"corpus_N_{k}": v for k, v in by_call.items()}}}
        # current / kronecker / patched run identical forward+backward passes: their minimum is the common estimate,
        # so the comparison between them is the sketching code alone
        fwd_key = "forward + backward (capture_module_io)"
        common_fwd = min(best[name]["timer"][fwd_key] for name in variants if "sorted" not in name)
        for name in variants:
            timer = best[name]["timer"]
            total = sum(timer.values())
            sketching = total - timer[fwd_key]
            fwd = timer[fwd_key] if "sorted" in name else common_fwd
            result[name] = {"seconds": total, "ratio_to_bare": bare_seconds / total, "sketching_seconds": sketching,
                            "forward_backward_seconds": fwd, "ratio_to_bare_common_forward": bare_seconds / (fwd + sketching),
                            "stages": {k: {"seconds": v, "share": v / total} for k, v in sorted(timer.items(), key=lambda kv: -kv[1])}}
        return result
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- run, report


def _version(name: str) -> Optional[str]:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def machine() -> dict:
    import psutil

    names = ("torch", "transformers", "ray", "faiss-cpu", "numpy", "pyarrow", "psutil", "chatterbot-corpus")
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "load_average_at_start": list(os.getloadavg()),
            "versions": {n: _version(n) for n in names},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run(settings: Settings, work_dir: Path, sections: set[str]) -> dict:
    started, info = time.perf_counter(), machine()
    cache_dir = work_dir / f"index_build-{settings.setup_key()}"
    start = time.perf_counter()
    setup = prepare_setup(settings, cache_dir)
    setup_seconds = time.perf_counter() - start
    scratch = cache_dir / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    result: dict = {
        "benchmark": "index build: throughput, bytes per document, peak RSS, sketch fidelity",
        "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
        "model": {"architecture": "llama", "parameters": int(sum(p.numel() for p in load_model(setup.model_dir).parameters())),
                  "tracked_modules": [[m.name, list(m.shape)] for m in find_tracked_modules(load_model(setup.model_dir))],
                  "training": setup.trained},
        "corpora": {label: corpus_stats(d) for label, d in setup.corpus_dirs.items()},
        "index_args": IndexArgs(sketch_size=settings.sketch_size, batch_size=settings.batch_size, workers=settings.workers).to_dict(),
        "queries": [dataclasses.asdict(q) for q in setup.queries],
    }
    timings = {"setup_seconds": setup_seconds}
    large = f"{settings.scale}N"
    if "throughput" in sections:
        start = time.perf_counter()
        result["throughput"] = measure_builds(setup, settings, scratch)
        result["scaling"] = decompose(result["throughput"])
        timings["throughput_seconds"] = time.perf_counter() - start
        result["bytes"] = measure_bytes(scratch / f"ray_{large}", settings, scratch)
        result["memory"] = {label: {name: {k: run_[k] for k in ("driver_peak_rss_mb", "worker_peak_rss_mb", "largest_descendants") if k in run_}
                                    for name, run_ in entry["runs"].items() if not name.startswith("bare x2")}
                            for label, entry in result["throughput"].items()}
        result["memory"]["index_faiss_mb"] = {label: _mb((scratch / f"ray_{label}" / "index.faiss").stat().st_size)
                                              for label in result["throughput"]}
    if "profile" in sections:
        start = time.perf_counter()
        result["profile"] = profile_worker(setup, settings)
        timings["profile_seconds"] = time.perf_counter() - start
    if "fidelity" in sections:
        start = time.perf_counter()
        stored = next((d for d in (scratch / "inprocess_N", scratch / "ray_N") if (d / "index.faiss").exists()), None)
        result["fidelity"] = measure_fidelity(setup, settings, scratch, stored)
        timings["fidelity_seconds"] = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    timings["total_seconds"] = time.perf_counter() - started
    result["timings"] = timings
    info["load_average_at_end"] = list(os.getloadavg())
    result["machine"] = info
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    return result


def markdown(result: dict) -> str:
    lines = []
    if "throughput" in result:
        lines += ["### Throughput (ratios: to the best bare forward+backward loop in wall time; to bare x2 in CPU time)", "",
                  "| corpus | run | e2e seq/s | e2e tok/s | e2e ratio | steady seq/s | steady tok/s | steady ratio | CPU ms/seq | "
                  "CPU ratio steady | CPU ratio e2e | busy | sketch_io share | driver RSS MB | worker RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, entry in result["throughput"].items():
            corpus = entry["corpus"]
            for name, r in entry["runs"].items():
                e2e, steady = r["end_to_end"], r["steady"]
                ratio = r.get("ratio_to_best_bare", {})
                cpu = r.get("cpu_ratio_to_bare_x2", {})
                share = steady.get("sketch_io_share_of_calls")
                name = f"{name} ({r['threads']} thread{'s' if r['threads'] > 1 else ''})" if name == INPROCESS else name
                lines.append(f"| {label} ({corpus['sequences']} seq) | {name} | {e2e['sequences_per_s']:.1f} | {e2e['tokens_per_s']:.0f} | "
                             f"{_fmt(ratio.get('end_to_end'))} | {steady['sequences_per_s']:.1f} | {steady['tokens_per_s']:.0f} | "
                             f"{_fmt(ratio.get('steady'))} | {_fmt(steady.get('cpu_ms_per_sequence'), '.2f')} | {_fmt(cpu.get('steady'))} | "
                             f"{_fmt(cpu.get('end_to_end'))} | {_fmt(steady.get('busy_fraction'))} | {_fmt(share) if share else '–'} | "
                             f"{r['driver_peak_rss_mb']:.0f} | {_fmt(r.get('worker_peak_rss_mb'), '.0f')} |")
        for label, entry in result["throughput"].items():
            for name in (n for n in entry["runs"] if n.startswith("ray job")):
                run = entry["runs"][name]
                lines += ["", f"{label}, {name}: phases (s) " + ", ".join(f"{k} {v:.1f}" for k, v in run["phases"].items())
                          + f"; rows per worker {run['steady']['rows_per_worker']}"]
        for label, scaling in result.get("scaling", {}).items():
            lines += ["", f"{label}: wall seconds = fixed + n x marginal: " + "; ".join(
                f"{name}: {fit['fixed_seconds']:.1f}s + {fit['marginal_ms_per_sequence']:.2f} ms/seq" for name, fit in scaling["fits"].items())]
            if "ray_asymptotic_ratio_to_bare_x2" in scaling:
                n = scaling.get("sequences_for_ratio_0.7")
                lines.append(f"{label}: Ray job vs bare x2: asymptotic ratio {_fmt(scaling['ray_asymptotic_ratio_to_bare_x2'])}; "
                             f"the end-to-end ratio reaches 0.7 from {'never' if n is None else f'{n:,.0f}'} sequences")
    if "throughput" in result:
        lines += ["", "### Peak RSS (MB) of the Ray job at both corpus sizes", "",
                  "| corpus | sequences | driver | driver peaks during | worker (max over actors) | index.faiss |", "|---|---|---|---|---|---|"]
        for label, entry in result["throughput"].items():
            run = entry["runs"][RAY_RUN]
            lines.append(f"| {label} | {entry['corpus']['sequences']} | {run['driver_peak_rss_mb']:.0f} | {run['driver_rss_peak_phase']['phase']} | "
                         f"{_fmt(run.get('worker_peak_rss_mb'), '.0f')} | {result['memory']['index_faiss_mb'][label]:.1f} |")
    if "bytes" in result:
        b = result["bytes"]
        lines += ["", f"### Bytes per sequence on disk ({b['sketch']} sketch, k={b['sketch_size']}, dim {b['dim']}, {b['sequences']} sequences)", "",
                  "| factory | index.faiss | docs.parquet | shards | total |", "|---|---|---|---|---|"]
        for factory in (key for key in b if isinstance(b[key], dict)):
            e = b[factory]
            lines.append(f"| {factory} | {e['index.faiss_bytes_per_sequence']:.0f} | {e['docs.parquet_bytes_per_sequence']:.0f} | "
                         f"{e['shards_bytes_per_sequence']:.0f} | {e['total_bytes_per_sequence']:.0f} |")
            if "index.faiss_per_row_bytes" in e:
                lines.append(f"| ({factory} index.faiss = {e['index.faiss_per_row_bytes']} B/row + {e['index.faiss_fixed_bytes'] / 2**20:.1f} MiB "
                             "of centroids and codebooks) | | | | |")
    if "profile" in result:
        p = result["profile"]
        lines += ["", f"### One worker's calls ({p['sketch']} sketch; the other: {p['other_sketch']}), 1 thread, {p['rows']} sequences, CPU seconds "
                  f"(bare forward+backward {p['bare_seconds']:.2f}s)", "",
                  "| variant | forward+backward s | sketching s | ratio to bare | top stages |", "|---|---|---|---|---|"]
        for name in PROFILE_VARIANTS:
            e = p[name]
            top = ", ".join(f"{k} {v['share']:.0%}" for k, v in list(e["stages"].items())[:4])
            lines.append(f"| {name} | {e['forward_backward_seconds']:.3f} | {e['sketching_seconds']:.3f} | {e['ratio_to_bare_common_forward']:.2f} | {top} |")
        lines += ["", "Padding efficiency (real / padded tokens): " + ", ".join(f"{k} {v:.2f}" for k, v in p["padding_efficiency"].items())]
    if "fidelity" in result:
        f = result["fidelity"]
        lines += ["", f"### Sketch fidelity vs exact EK-FAC scores ({f['corpus']['sequences']} sequences, {f['num_queries']} queries; "
                  f"unprojected split check: max rel. error {f['split_check_max_rel_error']:.1e})", "",
                  "| k | dim | bytes/seq | sketch | Pearson (± s.e.) | Spearman | recall@10 in top-10 | top-50 | top-100 (± s.e.) | stored floats |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for k in map(str, result["settings"]["sketch_sizes"]):
            for method in f["methods"]:
                entry = f[method][k]
                if "skipped" in entry:
                    lines.append(f"| {k} | {entry['dim']} | | {method} | skipped: {entry['skipped']} | | | | | |")
                    continue
                lines.append(f"| {k} | {entry['dim']} | {4 * entry['dim']} | {method} | {entry['pearson']:.3f} ± {entry['pearson_sem']:.3f} | "
                             f"{entry['spearman']:.3f} | {entry['recall10@10']:.2f} | {entry['recall10@50']:.2f} | "
                             f"{entry['recall10@100']:.2f} ± {entry['recall10@100_sem']:.2f} | {entry['stored_floats']:,} |")
    return "\n".join(lines)


def _fmt(value, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: about a minute")
    parser.add_argument("--sections", default="throughput,profile,fidelity", help="comma-separated subset of throughput,profile,fidelity")
    parser.add_argument("--work-dir", type=Path, default=RESULTS / ".work" / "index_build", help="cache of the model, corpora and factors")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/index_build.json or index_build_quick.json)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transformers", "ray", "faiss", "indexes", "influence"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Many small tensor ops: on a 2-core machine that is also busy, 2 intra-op threads are slower than 1
    # (the children set their own thread counts; the dense projection GEMMs use 2).
    torch.set_num_threads(1)
    if args.child:
        kind, spec, out = args.child
        result = CHILDREN[kind](json.loads(Path(spec).read_text()))
        Path(out).write_text(json.dumps(result))
        return result
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if sections - {"throughput", "profile", "fidelity"}:
        parser.error(f"unknown sections {sorted(sections - {'throughput', 'profile', 'fidelity'})}")
    settings = QUICK if args.quick else DEFAULT
    result = run(settings, args.work_dir, sections)
    out = args.out or RESULTS / ("index_build_quick.json" if args.quick else "index_build.json")
    write_json(out, result)
    print(markdown(result))
    print(f"\ntotal {result['timings']['total_seconds']:.0f}s (setup {result['timings']['setup_seconds']:.0f}s); "
          f"load average {result['machine']['load_average_at_start'][0]:.1f} -> {result['machine']['load_average_at_end'][0]:.1f}; wrote {out}")
    return result


if __name__ == "__main__":
    main()
