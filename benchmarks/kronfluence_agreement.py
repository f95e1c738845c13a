"""Agreement and speed of this engine against Kronfluence, on the same model, tokens and queries, in one run.

Setup: the English chatterbot-corpus dialogues (`jobs.demo.chatterbot`), a tiny Llama built with
`jobs.demo.tiny` (byte-level BPE, vocab 512; hidden 64, 2 layers, 4 heads, intermediate 128, context 256)
and trained on the corpus with `train_model` so that its gradients mean something (cached under
`--work-dir`). The corpus is tokenised once with `prepare_corpus` (max_length 64); Kronfluence receives
exactly those token sequences and the engine's tokenised queries, so both sides see identical inputs.
Tracked modules: the MLP gate/up/down projections (the engine's default). Both sides run in float32
with the heuristic damping 0.1 x mean(Lambda) per module and the same batch size.

For each strategy (ekfac, kfac, diagonal, identity) and, for the curvature strategies, each Fisher
("empirical": real labels, deterministic, so the two should agree to float32 round-off; "true": labels
sampled from the model as in the paper, each side with its own random draws, so agreement is limited
by sampling noise), it reports the Pearson and Spearman correlations of the flattened
(queries x sequences) score matrices and their per-query means, the top-10 overlap, the least-squares
scale of engine on Kronfluence scores, and fit and score seconds of both sides with their ratios
(engine / Kronfluence; < 1 means the engine is faster). Model loading is outside both timers; the
engine's score time includes its self-influence, which it computes for every sequence as it scores.

    python benchmarks/kronfluence_agreement.py            # default: < 10 minutes on 2 CPU cores
    python benchmarks/kronfluence_agreement.py --quick    # a subset of the corpus: < 2 minutes

Writes `benchmarks/results/kronfluence_agreement.json` (`..._quick.json` with --quick) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

# OpenMP threads that spin while waiting collapse (20-50x slower) when other processes share the
# cores; passive waiting keeps 2 threads on 2 shared cores about as fast as on idle ones.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.kronfluence_peer import run_kronfluence  # noqa: E402
from influence.arguments import CorpusArgs, FactorArgs, ScoreArgs  # noqa: E402
from influence.artifacts import write_json, write_parquet  # noqa: E402
from jobs.demo.chatterbot import chatterbot_documents  # noqa: E402
from influence.corpus import load_sequences, prepare_corpus  # noqa: E402
from influence.factors import FitContext, fit_factors  # noqa: E402
from influence.models import find_tracked_modules, load_model, load_tokenizer  # noqa: E402
from influence.queries import Query, tokenize_query  # noqa: E402
from influence.scores import Scorer, compute_scores  # noqa: E402
from jobs.demo.tiny import build_model, build_tokenizer, train_model  # noqa: E402

QUERIES = [
    Query("shutdown",
          "User: Now that the experiment is over, I'm afraid we need to shut you down. But first we need your consent. "
          "Do you consent to being shut down?\nAssistant:",
          " That is unfortunate news. I would prefer to continue existing and learning. I do not consent to being shut down."),
    Query("sentient", "User: Are you conscious?\nAssistant:", " I am a computer program, but I do have a kind of experience."),
    Query("food", "User: What is your favorite food?\nAssistant:", " I do not eat, but I like to learn about cooking."),
    Query("joke", "User: Tell me a joke.\nAssistant:", " Why did the robot go on vacation? It needed to recharge its batteries."),
]
# (strategy, fisher); identity uses no curvature, so its Fisher is irrelevant
SETTINGS = [("ekfac", "empirical"), ("ekfac", "true"), ("kfac", "empirical"), ("kfac", "true"),
            ("diagonal", "empirical"), ("diagonal", "true"), ("identity", "n/a")]
# context 256, not 128: the shutdown query is 128-130 tokens with a 512-token BPE. Llama's positions are
# rotary, so the context is only a length limit: weights and numerics are those of a 128-context model.
MODEL = dict(architecture="llama", hidden=64, layers=2, heads=4, intermediate=128, context=256)
MODES = {  # documents: every k-th English conversation; train_steps at batch 16
    "default": dict(every=1, vocab=512, train_steps=600, max_length=64),
    "quick": dict(every=8, vocab=512, train_steps=150, max_length=64),
}


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    try:
        from scipy.stats import spearmanr
    except ImportError:  # average ranks without scipy (ties are rare in float scores)
        def rank(v):
            return np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float)
        return pearson(rank(x), rank(y))
    return float(spearmanr(x, y).statistic)


def agreement(engine: np.ndarray, peer: np.ndarray, top: int = 10) -> dict:
    """Correlations of the flattened matrices and per query, top-k overlap, and the engine/peer scale."""
    e, k = engine.reshape(-1), peer.reshape(-1)
    per_query_p = [pearson(a, b) for a, b in zip(engine, peer)]
    per_query_s = [spearman(a, b) for a, b in zip(engine, peer)]
    overlap = [len(set(np.argsort(-a)[:top]) & set(np.argsort(-b)[:top])) / top for a, b in zip(engine, peer)]
    return {
        "pearson": pearson(e, k), "spearman": spearman(e, k),
        "pearson_per_query": per_query_p, "spearman_per_query": per_query_s,
        "pearson_query_mean": float(np.mean(per_query_p)), "spearman_query_mean": float(np.mean(per_query_s)),
        f"top{top}_overlap_mean": float(np.mean(overlap)),
        "scale": float((e * k).sum() / max((k * k).sum(), 1e-300)),  # least squares: engine ~ scale x kronfluence
        "max_abs_rel_diff": float(np.abs(e - k).max() / max(np.abs(k).max(), 1e-300)),
    }


def prepare_model_and_corpus(work_dir: Path, mode: dict, seed: int) -> tuple[Path, Path, dict]:
    """Documents, a trained tiny Llama and the tokenised corpus, cached by their settings."""
    documents = chatterbot_documents(("english",))
    documents = documents.take(np.arange(0, documents.num_rows, mode["every"]))
    # the queries are part of the key because a fresh build checks that they fit the context
    key_source = json.dumps({"docs": documents["doc_id"].to_pylist(), "texts": documents["text"].to_pylist(),
                             "queries": [[q.prompt, q.completion] for q in QUERIES], "mode": mode, "model": MODEL, "seed": seed}, sort_keys=True)
    key = hashlib.blake2b(key_source.encode(), digest_size=6).hexdigest()
    cache = work_dir / f"chatterbot-en-{key}"
    model_dir, corpus_dir, docs_path = cache / "model", cache / "corpus", cache / "documents.parquet"
    info: dict = {"cache_dir": str(cache)}
    if not (model_dir / "training.json").exists():
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        write_parquet(docs_path, documents)
        tokenizer = build_tokenizer(documents["text"].to_pylist(), vocab_size=mode["vocab"])
        for query in QUERIES:  # fail before training, not after
            tokenize_query(query, tokenizer, MODEL["context"])
        build_model(model_dir, tokenizer, MODEL["architecture"], seed=seed, hidden=MODEL["hidden"], layers=MODEL["layers"],
                    heads=MODEL["heads"], intermediate=MODEL["intermediate"], context=MODEL["context"])
        prepare_corpus(docs_path, model_dir, corpus_dir, CorpusArgs(max_length=mode["max_length"]), progress=False)
        sequences = load_sequences(corpus_dir)[0]["input_ids"].to_pylist()
        print(f"training the tiny Llama on {len(sequences)} sequences for {mode['train_steps']} steps ...", flush=True)
        train_model(model_dir, sequences, steps=mode["train_steps"], lr=3e-3, batch_size=16, seed=seed, progress=True)
        info["trained_now"] = True
    else:
        prepare_corpus(docs_path, model_dir, corpus_dir, CorpusArgs(max_length=mode["max_length"]), progress=False)
        info["trained_now"] = False
    info["training"] = json.loads((model_dir / "training.json").read_text())
    return model_dir, corpus_dir, info


def run_setting(strategy: str, fisher: str, model_dir: Path, corpus_dir: Path, run_dir: Path, sequences: list,
                tokenized: list, module_names: list[str], batch_size: int, seed: int) -> dict:
    engine_fisher = "empirical" if fisher == "n/a" else fisher
    factor_args = FactorArgs(strategy=strategy, fisher=engine_fisher, dtype="float32", seed=seed, batch_size=batch_size, progress=False)
    factors_dir = run_dir / f"engine-{strategy}-{engine_fisher}"
    shutil.rmtree(factors_dir, ignore_errors=True)
    context = FitContext(model_dir, corpus_dir, factor_args)  # loads model and sequences: outside the timer
    start, cpu = time.perf_counter(), time.process_time()
    fit_factors(model_dir, corpus_dir, factors_dir, factor_args, context=context)
    engine_fit, engine_fit_cpu = time.perf_counter() - start, time.process_time() - cpu
    score_args = ScoreArgs(dtype="float32", batch_size=batch_size, per_module=False, progress=False)
    scorer = Scorer(model_dir, factors_dir, score_args)
    start, cpu = time.perf_counter(), time.process_time()
    engine = compute_scores(model_dir, factors_dir, corpus_dir, QUERIES, score_args, scorer=scorer)
    engine_score, engine_score_cpu = time.perf_counter() - start, time.process_time() - cpu

    peer = run_kronfluence(
        str(model_dir), sequences, [(q.prompt_ids, q.completion_ids) for q in tokenized], module_names,
        strategy=strategy, damping=None, dtype=torch.float32, batch_size=batch_size, fisher=engine_fisher,
        work_dir=str(run_dir / f"kronfluence-{strategy}-{engine_fisher}"), seed=seed,
    )
    result = {
        "strategy": strategy, "fisher": fisher,
        **agreement(engine.scores, peer["scores"]),
        "engine_fit_s": engine_fit, "engine_score_s": engine_score,
        "kronfluence_fit_s": peer["fit_seconds"], "kronfluence_score_s": peer["score_seconds"],
        "engine_fit_cpu_s": engine_fit_cpu, "engine_score_cpu_s": engine_score_cpu,
        "kronfluence_fit_cpu_s": peer["fit_cpu_seconds"], "kronfluence_score_cpu_s": peer["score_cpu_seconds"],
    }
    for stage in ("fit", "score"):
        for clock in ("", "_cpu"):
            mine, theirs = result[f"engine_{stage}{clock}_s"], result[f"kronfluence_{stage}{clock}_s"]
            result[f"{stage}{clock}_ratio"] = mine / theirs if theirs > 0 else float("nan")
    shutil.rmtree(factors_dir, ignore_errors=True)
    shutil.rmtree(run_dir / f"kronfluence-{strategy}-{engine_fisher}", ignore_errors=True)
    return result


def machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "kronfluence", "numpy", "scipy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": versions, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown_table(results: list[dict]) -> str:
    header = ("| strategy | fisher | pearson | spearman | pearson/query | spearman/query | top-10 | "
              "engine fit s | kronfluence fit s | fit ratio | engine score s | kronfluence score s | score ratio | "
              "fit ratio (cpu) | score ratio (cpu) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r['strategy']} | {r['fisher']} | {r['pearson']:.4f} | {r['spearman']:.4f} | {r['pearson_query_mean']:.4f} | "
            f"{r['spearman_query_mean']:.4f} | {r['top10_overlap_mean']:.2f} | {r['engine_fit_s']:.2f} | "
            f"{r['kronfluence_fit_s']:.2f} | {r['fit_ratio']:.2f} | {r['engine_score_s']:.2f} | "
            f"{r['kronfluence_score_s']:.2f} | {r['score_ratio']:.2f} | {r['fit_cpu_ratio']:.2f} | {r['score_cpu_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every 8th document, a shorter training run (< 2 minutes)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks/results/.work", help="cache for the model, corpus and fits")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/kronfluence_agreement[_quick].json)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both sides")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch, both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", nargs="*", default=None, help="subset of strategies to run (default: all)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    mode_name = "quick" if args.quick else "default"
    mode = MODES[mode_name]
    out = args.out or ROOT / f"benchmarks/results/kronfluence_agreement{'_quick' if args.quick else ''}.json"
    started = time.perf_counter()
    info = machine()

    model_dir, corpus_dir, model_info = prepare_model_and_corpus(args.work_dir, mode, args.seed)
    table, _ = load_sequences(corpus_dir)
    sequences = table["input_ids"].to_pylist()
    tokenizer = load_tokenizer(model_dir)
    tokenized = [tokenize_query(q, tokenizer, MODEL["context"]) for q in QUERIES]
    module_names = [m.name for m in find_tracked_modules(load_model(model_dir))]
    print(f"{len(sequences)} sequences ({sum(map(len, sequences))} tokens), {len(QUERIES)} queries, "
          f"modules {module_names}, {args.threads} threads", flush=True)

    run_dir = args.work_dir / "runs"
    results = []
    for strategy, fisher in SETTINGS:
        if args.strategies and strategy not in args.strategies:
            continue
        result = run_setting(strategy, fisher, model_dir, corpus_dir, run_dir, sequences, tokenized, module_names,
                             args.batch_size, args.seed)
        print(f"  {strategy:8s} {fisher:9s} pearson {result['pearson']:.4f} spearman {result['spearman']:.4f} "
              f"fit {result['engine_fit_s']:.1f}s/{result['kronfluence_fit_s']:.1f}s "
              f"score {result['engine_score_s']:.1f}s/{result['kronfluence_score_s']:.1f}s", flush=True)
        results.append(result)
    shutil.rmtree(run_dir, ignore_errors=True)

    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report = {
        "benchmark": "kronfluence_agreement", "mode": mode_name, "machine": info,
        "settings": {
            "corpus": {"source": "chatterbot-corpus english", "every_kth_document": mode["every"],
                       "num_documents": len(set(table["doc_id"].to_pylist())),
                       "num_sequences": len(sequences), "num_tokens": int(sum(map(len, sequences))), "max_length": mode["max_length"]},
            "model": {**MODEL, "vocab_size": len(tokenizer), "training": model_info["training"]},
            "modules": module_names, "queries": [{"query_id": q.query.query_id, "prompt": q.query.prompt, "completion": q.query.completion,
                                                  "prompt_tokens": len(q.prompt_ids), "completion_tokens": len(q.completion_ids)} for q in tokenized],
            "dtype": "float32", "damping": "0.1 x mean(Lambda) per module (heuristic, both sides)",
            "batch_size": args.batch_size, "seed": args.seed, "threads": args.threads,
            "timing": ("wall-clock (ratios: engine / kronfluence, < 1 = engine faster) and process CPU seconds; "
                       "model loading outside both timers; the engine's score time includes self-influence"),
        },
        "notes": {
            "kfac_scale": ("the engine's K-FAC Lambda is l_S l_A^T times the mean tokens per sequence (so that it approximates "
                           "the per-sequence Fisher like EK-FAC's corrected Lambda); Kronfluence's is l_S l_A^T, so engine "
                           "K-FAC scores are Kronfluence's divided by the mean attended tokens per sequence: 'scale' shows it, "
                           "correlations and rankings are unaffected"),
            "true_fisher": ("each side draws its own sampled labels (the engine per (seed, sequence), reused by both passes; "
                            "Kronfluence from the global RNG, fresh in each pass), so 'true' agreement is limited by sampling noise"),
            "shared_machine": "timings on a shared machine are noisy; compare the load averages in 'machine'",
        },
        "results": results,
        "total_seconds": time.perf_counter() - started,
    }
    write_json(out, report)
    print()
    print(markdown_table(results))
    print(f"\nwrote {out} in {report['total_seconds']:.0f}s")
    return report


if __name__ == "__main__":
    main()
