"""What every benchmark shares: machine facts, JSON output, statistics, memory and time, the bare baseline, setup.

- Machine facts (`machine_facts`, `finish_machine`): cores, RAM, CPU model, load averages at start and end, torch
  threads, package versions (peers included when installed), the git commit.
- Output (`write_results`, `default_out`): atomic JSON with the command line that produced it; `--quick` runs go
  to a temporary path so that they never overwrite the recorded results in `benchmarks/results/`.
- Statistics: `percentiles`, `mean_sem`, `pearson`, `spearman`, `top_ids`, `recall_at_k`, `topk_overlap`.
- Memory and time: `peak_rss_mb` (VmHWM from /proc: getrusage's ru_maxrss is inherited across fork+exec, so it is
  wrong for children), `reset_peak_rss`, `reset_peaks`, `process_peaks` (VmHWM of descendants, e.g. Ray workers),
  `MemorySampler` (polled peaks of each process's private memory and of the machine's memory in use: VmHWM counts
  shared pages once per process that maps them), `Timer`.
- The reference of every throughput ratio, `bare_forward_backward`: a plain `model(...).loss.backward()` loop with
  every parameter trainable, over the same sequences in the same batches and shards as the engine, run as a stage
  pass on any executor (this process, or the same Ray workers as the engine).
- Setup shared by the scripts: `prepare_trained_model` (a tiny Llama trained on documents, and its corpus, cached
  by content) and `first_exchange_queries` (held-out chatterbot exchanges as queries).

Importing this module sets the environment the benchmarks run in (before torch is imported): passive OpenMP
waiting, no tokenizer threads, and the repository on PYTHONPATH so that Ray workers can import it.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata as md
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = RESULTS / ".work"  # git-ignored caches of models, corpora, factors and indexes

# Spinning OpenMP threads collapse when other processes share the cores; passive waiting does not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):  # Ray workers import benchmarks.common
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from influence.artifacts import write_json, write_parquet  # noqa: E402
from influence.corpus import load_sequences, prepare_corpus, shard_rows, token_rows  # noqa: E402
from influence.gradients import make_token_batch, plan_model_batches  # noqa: E402
from influence.models import find_tracked_modules, load_model  # noqa: E402
from influence.queries import Query  # noqa: E402
from influence.stage import Executor, Pass, run_stage  # noqa: E402

PACKAGES = ("influence-engine", "torch", "transformers", "numpy", "scipy", "pyarrow", "faiss-cpu", "ray", "chatterbot-corpus")
PEERS = ("kronfluence", "traker", "bergson")
PEER_SITES = (WORK / "bergson_site",)  # peers installed with `pip install --target` outside the venv (see bergson_peer.py)


# --------------------------------------------------------------------------- machine facts


def package_versions(names: Iterable[str]) -> dict[str, Optional[str]]:
    """Installed version of each distribution, None when it is not installed."""
    versions: dict[str, Optional[str]] = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def peer_versions() -> dict[str, Optional[str]]:
    """Installed version of each peer, in the venv or in a peer's own site directory; None when it is not installed."""
    versions = package_versions(PEERS)
    for name in [n for n, v in versions.items() if v is None]:
        found = next(iter(md.distributions(name=name, path=[str(site) for site in PEER_SITES])), None)
        versions[name] = found.version if found else None
    return versions


def git_commit() -> Optional[str]:
    """The repository's HEAD commit (read-only), or None outside a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def machine_facts(extra_versions: Iterable[str] = ()) -> dict[str, Any]:
    """Everything that makes a figure comparable: the hardware, its load, threads and versions."""
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
        "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": memory_gib(), "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_start": list(os.getloadavg()),
        "versions": package_versions((*PACKAGES, *extra_versions)), "peers": peer_versions(),
        "git_commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def finish_machine(facts: dict[str, Any]) -> dict[str, Any]:
    """The facts with the load averages at the end of the run added."""
    return {**facts, "load_average_at_end": list(os.getloadavg())}


# --------------------------------------------------------------------------- JSON output


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars and arrays as Python values, paths as strings and NaN/inf as None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    """The command that reproduces this run."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{script}", *args])


def default_out(name: str, quick: bool) -> Path:
    """`benchmarks/results/<name>.json`, or a temporary path for `--quick` runs (never the recorded results)."""
    return Path(tempfile.gettempdir()) / f"{name}_quick.json" if quick else RESULTS / f"{name}.json"


def write_results(path: Path, result: dict[str, Any], command: str) -> Path:
    """Write `result` (with the command line first) atomically as strict JSON; returns the path."""
    write_json(Path(path), jsonable({"command": command, **result}))
    return Path(path)


def publish(script: str, result: dict[str, Any], facts: dict[str, Any], table: str, out: Optional[Path], quick: bool,
            argv: Optional[Sequence[str]]) -> Path:
    """Finish a benchmark whose result has a markdown table: the machine's end facts and the table into the result, the
    JSON written (`out`, else `default_out`), the table and the path printed; returns the path."""
    result.update(machine=finish_machine(facts), markdown=table)
    path = write_results(out or default_out(Path(script).stem, quick), result, command_line(script, argv))
    print(table)
    print(f"written to {path}")
    return path


# --------------------------------------------------------------------------- statistics


def percentiles(values: Iterable[float], points: Sequence[int] = (50, 95)) -> dict[str, float]:
    """p50, p95 (or `points`), mean, min, max and count of some values."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return {"n": 0}
    return {**{f"p{p}": float(np.percentile(array, p)) for p in points}, "mean": float(array.mean()),
            "min": float(array.min()), "max": float(array.max()), "n": int(array.size)}


def mean_sem(values: Iterable[float]) -> dict[str, float]:
    """Mean and its standard error over the finite values, with min, max and how many were not finite."""
    array = np.asarray(list(values), dtype=np.float64)
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return {"mean": float("nan"), "sem": float("nan"), "n": 0, "not_finite": int(array.size)}
    sem = float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1 else float("nan")
    return {"mean": float(finite.mean()), "sem": sem, "min": float(finite.min()), "max": float(finite.max()),
            "n": int(finite.size), "not_finite": int(array.size - finite.size)}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import rankdata

    return pearson(rankdata(np.asarray(x, dtype=np.float64)), rankdata(np.asarray(y, dtype=np.float64)))


def top_ids(scores: Sequence[float], k: int, sign: str = "+") -> np.ndarray:
    """Positions of the k most positive ("+") or most negative ("-") scores, best first (ties by position)."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.argsort(-scores if sign == "+" else scores, kind="stable")[:k]


def recall_at_k(found: Iterable[int], truth: Iterable[int]) -> float:
    """The fraction of the `truth` ids that `found` holds (recall@k of the exact top-k when truth is that top-k)."""
    truth = set(int(t) for t in truth)
    return len(truth & set(int(f) for f in found)) / len(truth) if truth else float("nan")


def topk_overlap(a: Sequence[float], b: Sequence[float], k: int, sign: str = "+") -> float:
    """How many of b's top-k (by sign) are among a's top-k, as a fraction of k."""
    return recall_at_k(top_ids(a, k, sign), top_ids(b, k, sign))


# --------------------------------------------------------------------------- memory and time


def _status_kib(pid: int | str, field: str) -> Optional[int]:
    return _proc_kib(f"/proc/{pid}/status", field)


def _proc_kib(path: str, field: str) -> Optional[int]:
    """A `field: <n> kB` line of a /proc file (a process's status, /proc/meminfo), in KiB."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb(pid: int | str = "self") -> Optional[float]:
    """Peak resident memory of a process (VmHWM), in MiB; None when /proc cannot tell."""
    kib = _status_kib(pid, "VmHWM")
    return None if kib is None else round(kib / 1024, 1)


def rss_mb(pid: int | str = "self") -> Optional[float]:
    """Resident memory of a process now (VmRSS), in MiB; None when /proc cannot tell."""
    kib = _status_kib(pid, "VmRSS")
    return None if kib is None else round(kib / 1024, 1)


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset a process's VmHWM to its current RSS (Linux >= 4.0; this process by default, or one of its own, e.g. a
    Ray worker), so the next reading is the peak of what follows."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def reset_peaks(match: Optional[str] = None) -> None:
    """`reset_peak_rss` of this process and of its live descendants whose command line contains `match` (all when
    None): a stage's `process_peaks` is then its own, not the peak of the stages its workers ran before."""
    reset_peak_rss()
    for found in process_peaks(match):
        reset_peak_rss(found["pid"])


def descendants(pid: Optional[int] = None) -> list[int]:
    """Every live descendant of `pid` (default: this process), from the parent ids in /proc/*/stat."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, stack = [], [pid or os.getpid()]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def matching_descendants(match: Optional[str] = None) -> list[tuple[int, str]]:
    """(pid, command line) of this process's live descendants whose command line contains `match` (all when None)."""
    found = []
    for pid in descendants():
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if match is None or match in name:
            found.append((pid, name[:100]))
    return found


def process_peaks(match: Optional[str] = None) -> list[dict[str, Any]]:
    """VmHWM of this process's live descendants whose command line contains `match` (all when None), largest first.

    Read them before the processes exit (e.g. inside a RayExecutor's `with` block): VmHWM is kept by the kernel for
    the process's lifetime, so one reading at the end gives the peak, without polling. It counts every page a process
    maps, shared ones included: `MemorySampler` tells private memory and the machine's total apart.
    """
    peaks = [{"pid": pid, "name": name, "peak_rss_mb": peak} for pid, name in matching_descendants(match)
             if (peak := peak_rss_mb(pid)) is not None]
    return sorted(peaks, key=lambda p: -p["peak_rss_mb"])


def machine_used_mb() -> Optional[float]:
    """The machine's memory in use (MemTotal - MemAvailable), in MiB: private pages and shared memory, each page once,
    not the page cache the kernel can reclaim; None when /proc cannot tell."""
    total, available = _proc_kib("/proc/meminfo", "MemTotal"), _proc_kib("/proc/meminfo", "MemAvailable")
    return None if total is None or available is None else round((total - available) / 1024, 1)


class MemorySampler:
    """What VmHWM cannot tell, polled every `interval` seconds over a `with` block: each process's peak private memory
    (RssAnon) and the machine's peak memory in use (`machine_used_mb`).

    A Ray worker's VmHWM counts every page it maps: the model file's pages, and the object store's shared pages (the
    factors a pass shares, and pages that an earlier pass's shared data left touched, which stay mapped). Those are
    the same physical pages in every worker and in the driver, so adding up VmHWMs counts them once per process;
    private memory and the machine's total count each page once. A poll misses peaks shorter than `interval`; the
    kernel folds its per-CPU counts into /proc/meminfo about once a second (vm.stat_interval), so the machine's total
    misses peaks shorter than that, and it includes whatever else runs on the machine (`machine_used_before_mb` is its
    reading at the start).
    """

    def __init__(self, match: Optional[str] = None, interval: float = 0.25):
        self.match, self.interval = match, interval
        self._private: dict[int, float] = {}  # pid: peak RssAnon in MiB
        self.machine_used_before_mb = self._machine_peak = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "MemorySampler":
        self.machine_used_before_mb = self._machine_peak = machine_used_mb()
        self._sample()
        self._thread = threading.Thread(target=self._poll, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        used = machine_used_mb()
        if used is not None:
            self._machine_peak = max(self._machine_peak or 0.0, used)
        for pid in [os.getpid(), *(pid for pid, _ in matching_descendants(self.match))]:
            kib = _status_kib(pid, "RssAnon")
            if kib is not None:
                self._private[pid] = max(self._private.get(pid, 0.0), round(kib / 1024, 1))

    def figures(self) -> dict[str, Any]:
        """`machine_used_mb` (peak) and `machine_used_before_mb`; `driver_private_mb` and `workers_private_mb` (largest
        first): peaks of RssAnon, in MiB."""
        driver = self._private.get(os.getpid())
        workers = sorted((peak for pid, peak in self._private.items() if pid != os.getpid()), reverse=True)
        return {"machine_used_mb": self._machine_peak, "machine_used_before_mb": self.machine_used_before_mb,
                "driver_private_mb": driver, "workers_private_mb": workers}


class Timer:
    """Wall-clock and process CPU seconds of a `with` block: `with Timer() as t: ...; t.seconds, t.cpu_seconds`."""

    def __enter__(self) -> "Timer":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self.seconds = self.cpu_seconds = float("nan")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = time.process_time() - self._cpu


# --------------------------------------------------------------------------- the bare forward+backward baseline


def _trainable_model(model_dir: str) -> torch.nn.Module:
    return load_model(model_dir).requires_grad_(True)  # load_model freezes every parameter; the baseline trains them all


def bare_work(workspace, shared: tuple[str, int], rows) -> dict[str, Any]:
    """One shard of the baseline: `model(...).loss.backward()` over the shard's sequences, in the engine's batches."""
    model_dir, batch_tokens = shared
    model = workspace.get(("bare-model", model_dir), lambda: _trainable_model(model_dir))
    # the index stage's batches: its budget is lowered for a large model by its tracked modules' captures (the MLPs)
    start, padded = time.perf_counter(), 0
    for positions in plan_model_batches(rows.lengths, batch_tokens, find_tracked_modules(model)):
        batch = make_token_batch([rows.sequence(i) for i in positions])
        labels = batch.input_ids.masked_fill(~batch.attention_mask, -100)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
        padded += batch.input_ids.numel()
    return {"seconds": time.perf_counter() - start, "sequences": len(rows), "tokens": int(sum(rows.lengths)),
            "padded_tokens": padded, "pid": os.getpid()}


def bare_forward_backward(model_dir: Path | str, sequences: pa.Table, batch_tokens: int, executor: Optional[Executor] = None,
                          shard_size: int = 256, repeats: int = 2) -> dict[str, Any]:
    """Throughput of a plain training step (forward, loss, backward, all parameters trainable): the reference rate.

    The sequences are cut into the index stage's shards (`shard_size` rows) and batched by the same padded-token
    budget (`plan_batches`), and the loop runs as a pass on `executor` (default: this process), so it has the
    engine's layout: the same workers, threads and task dispatch. The first of `repeats` runs also loads the model
    into each worker; the figures are those of the last run (warm), with the first one's seconds beside them.
    """
    num_shards = max(1, -(-sequences.num_rows // shard_size))
    shards = [shard_rows(sequences.num_rows, k, num_shards) for k in range(num_shards)]
    runs = []
    for _ in range(max(1, repeats)):
        parts: list[dict] = []
        step = Pass("bare", list(range(num_shards)), bare_work, save=lambda task, result: parts.append(result),
                    payload=lambda k: token_rows(sequences, shards[k]), shared=(str(Path(model_dir).resolve()), batch_tokens),
                    shared_key=("bare", str(model_dir), batch_tokens), sizes=[len(r) for r in shards])
        with Timer() as timer:
            run_stage("bare", [step], executor, progress=False)
        runs.append((timer.seconds, parts))
    seconds, parts = runs[-1]
    n, tokens = sum(p["sequences"] for p in parts), sum(p["tokens"] for p in parts)
    return {"seconds": seconds, "first_run_seconds": runs[0][0], "sequences": n, "tokens": tokens,
            "sequences_per_s": n / seconds, "tokens_per_s": tokens / seconds,
            "padding_efficiency": tokens / max(1, sum(p["padded_tokens"] for p in parts)),
            "workers_seen": len({p["pid"] for p in parts}), "shards": num_shards, "batch_tokens": batch_tokens}


# --------------------------------------------------------------------------- setup shared by the scripts


@dataclass(frozen=True)
class TinyLlama:
    """A tiny Llama (`jobs.demo.tiny`) and how it is trained on the benchmark's documents."""

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


def prepare_trained_model(work_dir: Path, documents: pa.Table, spec: TinyLlama, max_length: int, min_tokens: int = 2,
                          tokenizer=None, progress: bool = False) -> tuple[Path, Path]:
    """A tiny Llama trained on `documents`, with a byte-level BPE trained on them (or `tokenizer`), and their corpus.

    Returns (model_dir, corpus_dir), cached under `work_dir` by the documents' text, the tokenizer, the spec, the
    chunking and the torch version. Training runs on one torch thread, so that a cached model is what a fresh run
    would train, bit for bit.
    """
    from jobs.demo.tiny import build_model, build_tokenizer, train_model
    from influence.arguments import CorpusArgs

    texts = documents["text"].to_pylist()
    key_source = {"texts": hashlib.blake2b("\x00".join(texts).encode(), digest_size=16).hexdigest(),
                  "tokenizer": None if tokenizer is None else hashlib.blake2b(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
                  "spec": asdict(spec), "max_length": max_length, "min_tokens": min_tokens, "torch": torch.__version__}
    cache = Path(work_dir) / f"model-{hashlib.blake2b(json.dumps(key_source, sort_keys=True).encode(), digest_size=6).hexdigest()}"
    model_dir, corpus_dir, documents_path = cache / "model", cache / "corpus", cache / "documents.parquet"
    corpus_args = CorpusArgs(max_length=max_length, min_tokens=min_tokens)
    if not (model_dir / "training.json").exists():
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        write_parquet(documents_path, documents)
        tokenizer = tokenizer or build_tokenizer(texts, vocab_size=spec.vocab_size)
        build_model(model_dir, tokenizer, "llama", seed=spec.seed, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                    intermediate=spec.intermediate, context=spec.context)
        prepare_corpus(documents_path, model_dir, corpus_dir, corpus_args, progress=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train_model(model_dir, load_sequences(corpus_dir)[0]["input_ids"].to_pylist(), steps=spec.train_steps, lr=spec.lr,
                        batch_size=spec.train_batch, seed=spec.seed, progress=progress)
        finally:
            torch.set_num_threads(threads)
    prepare_corpus(documents_path, model_dir, corpus_dir, corpus_args, progress=False)  # checks a cached corpus
    return model_dir, corpus_dir


def first_exchange(text: str) -> Optional[tuple[str, str]]:
    """(prompt "User: ...\\nAssistant:", completion " ...") of a rendered chatterbot conversation, or None."""
    if not text.startswith("User: ") or "\nAssistant: " not in text:
        return None
    user, rest = text[len("User: "):].split("\nAssistant: ", 1)
    answer = rest.split("\nUser: ", 1)[0]
    return (f"User: {user}\nAssistant:", f" {answer}") if user.strip() and answer.strip() else None


def first_exchange_queries(documents: pa.Table, count: int, model_dir: Path, max_tokens: int) -> list[Query]:
    """Queries from the first exchange of `documents` (in their order), round-robin over languages, that fit `max_tokens`."""
    from influence.errors import InfluenceError
    from influence.models import load_tokenizer
    from influence.queries import tokenize_query

    by_lang: dict[str, list[Query]] = {}
    for doc_id, text, lang in zip(documents["doc_id"].to_pylist(), documents["text"].to_pylist(), documents["lang"].to_pylist()):
        exchange = first_exchange(text)
        if exchange is not None:
            by_lang.setdefault(lang, []).append(Query(f"{lang}:{doc_id}", *exchange, lang))
    tokenizer, queries = load_tokenizer(model_dir), []
    pools = [pool[::-1] for _, pool in sorted(by_lang.items())]
    while len(queries) < count and any(pools):
        for pool in pools:
            while pool and len(queries) < count:
                query = pool.pop()
                try:
                    tokenize_query(query, tokenizer, max_tokens)
                except InfluenceError:
                    continue  # longer than the context: the next one of this language
                queries.append(query)
                break
    if len(queries) < count:
        raise InfluenceError(f"only {len(queries)} held-out exchanges fit {max_tokens} tokens; {count} were asked for")
    return queries


def sketch_scores(engine, queries: Sequence[Query]) -> tuple[np.ndarray, np.ndarray]:
    """What the index ranks by: <sketch(q), sketch(z)> for every stored row, and ||W(q)|| (the exact whitened norms).

    The query sketches are the engine's own (`QueryEngine.sketch_queries`); the inner products with every row of its
    4-bit store come from `search_both_signs` asked for all rows. Returns (queries, sequences) scores in seq_id order
    (rows the index does not hold stay NaN) and (queries,) norms.
    """
    from indexes.search import search_both_signs

    sketches, norms = engine.sketch_queries(queries)
    (scores, rows), _ = search_both_signs(engine.store, sketches, len(engine.seq_ids))
    out = np.full((len(queries), engine.sequences.num_rows), np.nan)
    for qi in range(len(queries)):
        out[qi, engine.seq_ids[rows[qi]]] = scores[qi]
    return out, norms


def dir_bytes(path: Path) -> dict[str, int]:
    """Bytes of every file under `path`, by relative name."""
    path = Path(path)
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
