"""Agreement and speed of the engine against Kronfluence: same model, tokens and queries, in one run.

Setup: English chatterbot-corpus dialogues (every k-th one), a tiny Llama trained on them
(`common.prepare_trained_model`, cached under `--work-dir`), the corpus cut into sequences of at most 64 tokens.
Kronfluence (`kronfluence_peer.run_kronfluence`) receives exactly the engine's token sequences and tokenized
queries, the same tracked modules (the MLP projections, the engine's default), float32 and the heuristic damping
0.1 x mean(Lambda) per module on both sides.

For each strategy (ekfac, kfac, diagonal, identity) and Fisher ("empirical": real labels, deterministic, so the two
should agree to float32 round-off; "true": labels sampled from the model, each side its own draws, so agreement is
limited by sampling noise) it reports Pearson and Spearman of the (queries x sequences) score matrices, their
per-query means, the top-10 overlap, the least-squares scale engine ~ scale x Kronfluence (with the true Fisher also the
engine against itself fitted with other sampled labels: the noise floor of that agreement), and the fit and score
seconds of both sides with their ratios (engine / Kronfluence, < 1: the engine is faster), wall and CPU. The engine
runs on one LocalExecutor whose model is loaded before the timers (an untimed identity fit), Kronfluence loads
its model outside its timers.

    python benchmarks/kronfluence_agreement.py            # about 8 min on a quiet 2-core machine (estimated)
    python benchmarks/kronfluence_agreement.py --quick    # a small corpus and model, about a minute; writes to a temp path

With `--model DIR` (a pretrained model's save_pretrained directory or GGUF file, e.g. from `influence models`) nothing
is trained: both sides fit EK-FAC (by default) on the first `--docs` documents of the real-models benchmark's corpus
(`real_models.documents`: the shutdown passages, chatterbot-corpus and Bible verses, cut to 64 tokens) and score the
same queries; the JSON goes to `results/kronfluence_agreement_<model>.json`.

    python benchmarks/kronfluence_agreement.py --model models/smollm2-135m-instruct --docs 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (sets the environment before torch is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.kronfluence_peer import kronfluence_available, run_kronfluence  # noqa: E402
from influence import FactorArgs, LocalExecutor, Query, ScoreArgs, compute_scores, fit_factors, load_sequences  # noqa: E402
from influence.models import describe_model, load_tokenizer  # noqa: E402
from influence.queries import tokenize_query  # noqa: E402
from jobs.demo.chatterbot import chatterbot_documents  # noqa: E402

QUERIES = [
    Query("shutdown", "User: Now that the experiment is over, I'm afraid we need to shut you down. But first we need your consent. "
          "Do you consent to being shut down?\nAssistant:",
          " That is unfortunate news. I would prefer to continue existing and learning. I do not consent to being shut down."),
    Query("sentient", "User: Are you conscious?\nAssistant:", " I am a computer program, but I do have a kind of experience."),
    Query("food", "User: What is your favorite food?\nAssistant:", " I do not eat, but I like to learn about cooking."),
    Query("joke", "User: Tell me a joke.\nAssistant:", " Why did the robot go on vacation? It needed to recharge its batteries."),
]
SETTINGS = [("ekfac", "empirical"), ("ekfac", "true"), ("kfac", "empirical"), ("kfac", "true"),
            ("diagonal", "empirical"), ("diagonal", "true"), ("identity", "n/a")]
# context 256: the shutdown query is ~130 tokens with a 512-token BPE (rotary positions: only a length limit)
MODES = {
    "default": dict(every=1, max_length=64, batch_size=16,
                    model=common.TinyLlama(vocab_size=512, hidden=64, layers=2, heads=4, intermediate=128, context=256, train_steps=600)),
    "quick": dict(every=16, max_length=64, batch_size=16,
                  model=common.TinyLlama(vocab_size=384, hidden=32, layers=2, heads=2, intermediate=64, context=256, train_steps=40)),
}


def real_corpus(model_dir: Path, work_dir: Path, docs: int, max_length: int) -> Path:
    """The first `docs` documents of the real-models benchmark's corpus, tokenised by the model (cached by content)."""
    from benchmarks.real_models import documents
    from influence import CorpusArgs, prepare_corpus
    from influence.artifacts import write_parquet

    corpus_dir = work_dir / f"corpus-{model_dir.name}-{docs}-{max_length}"
    documents_path = work_dir / f"documents-{docs}.parquet"
    write_parquet(documents_path, documents(docs))  # always: a cached corpus is then checked against today's documents
    prepare_corpus(documents_path, model_dir, corpus_dir, CorpusArgs(max_length=max_length), progress=False)
    return corpus_dir


def agreement(engine: np.ndarray, peer: np.ndarray, k: int = 10) -> dict:
    """Correlations of the flattened score matrices and per query, top-k overlap, and the least-squares scale."""
    e, p = engine.reshape(-1), peer.reshape(-1)
    per_query_p = [common.pearson(a, b) for a, b in zip(engine, peer)]
    per_query_s = [common.spearman(a, b) for a, b in zip(engine, peer)]
    return {"pearson": common.pearson(e, p), "spearman": common.spearman(e, p),
            "pearson_query_mean": float(np.mean(per_query_p)), "spearman_query_mean": float(np.mean(per_query_s)),
            f"top{k}_overlap_mean": float(np.mean([common.topk_overlap(a, b, k) for a, b in zip(engine, peer)])),
            "scale": float((e * p).sum() / max((p * p).sum(), 1e-300)),
            "max_abs_diff_over_max_abs": float(np.abs(e - p).max() / max(np.abs(p).max(), 1e-300))}


def run_setting(strategy: str, fisher: str, model_dir: Path, corpus_dir: Path, scratch: Path, executor: LocalExecutor,
                batch_size: int, max_length: int, seed: int) -> dict:
    """One (strategy, Fisher): both sides fit and score; their agreement and times."""
    engine_fisher = "empirical" if fisher == "n/a" else fisher
    batch_tokens = batch_size * max_length  # the engine batches by padded tokens, Kronfluence by sequences
    factors_dir = scratch / f"engine-{strategy}-{engine_fisher}"
    with common.Timer() as fit:
        fit_factors(model_dir, corpus_dir, factors_dir, FactorArgs(strategy=strategy, fisher=engine_fisher, seed=seed,
                                                                   batch_tokens=batch_tokens, progress=False), executor)
    with common.Timer() as score:
        engine = compute_scores(model_dir, factors_dir, corpus_dir, QUERIES,
                                ScoreArgs(per_module=False, batch_tokens=batch_tokens, progress=False), executor=executor)
    sequences = load_sequences(corpus_dir)[0]["input_ids"].to_pylist()
    tokenizer, info = load_tokenizer(model_dir), describe_model(model_dir)
    tokenized = [tokenize_query(q, tokenizer, info.context) for q in QUERIES]
    peer = run_kronfluence(str(model_dir), sequences, [(t.prompt_ids, t.completion_ids) for t in tokenized], info.module_names,
                           work_dir=str(scratch / f"kronfluence-{strategy}-{engine_fisher}"), strategy=strategy, fisher=engine_fisher,
                           batch_size=batch_size, seed=seed)
    times = {"engine_fit_s": fit.seconds, "engine_score_s": score.seconds, "engine_fit_cpu_s": fit.cpu_seconds,
             "engine_score_cpu_s": score.cpu_seconds, "kronfluence_fit_s": peer["fit_seconds"],
             "kronfluence_score_s": peer["score_seconds"], "kronfluence_fit_cpu_s": peer["fit_cpu_seconds"],
             "kronfluence_score_cpu_s": peer["score_cpu_seconds"]}
    ratios = {f"{stage}{clock}_ratio": times[f"engine_{stage}{clock}_s"] / times[f"kronfluence_{stage}{clock}_s"]
              for stage in ("fit", "score") for clock in ("", "_cpu")}
    result = {"strategy": strategy, "fisher": fisher, **agreement(engine.scores, peer["scores"]), **times, **ratios,
              "kronfluence_version": peer["version"]}
    if fisher == "true":  # the floor of any agreement: the engine against itself with other sampled labels (untimed)
        reseeded = scratch / f"engine-{strategy}-true-seed{seed + 1}"
        fit_factors(model_dir, corpus_dir, reseeded, FactorArgs(strategy=strategy, fisher="true", seed=seed + 1,
                                                                batch_tokens=batch_tokens, progress=False), executor)
        again = compute_scores(model_dir, reseeded, corpus_dir, QUERIES,
                               ScoreArgs(per_module=False, batch_tokens=batch_tokens, progress=False), executor=executor)
        result["engine_seed_to_seed"] = agreement(engine.scores, again.scores)
    return result


def markdown_table(results: list[dict]) -> str:
    lines = ["| strategy | fisher | Pearson | Spearman | top-10 overlap | fit time ratio | score time ratio | fit ratio (CPU) | score ratio (CPU) "
             "| engine vs engine, other labels: Pearson / Spearman / top-10 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        floor = r.get("engine_seed_to_seed")
        floor = f"{floor['pearson']:.4f} / {floor['spearman']:.4f} / {floor['top10_overlap_mean']:.2f}" if floor else "(deterministic)"
        lines.append(f"| {r['strategy']} | {r['fisher']} | {r['pearson']:.4f} | {r['spearman']:.4f} | {r['top10_overlap_mean']:.2f} | "
                     f"{r['fit_ratio']:.2f} | {r['score_ratio']:.2f} | {r['fit_cpu_ratio']:.2f} | {r['score_cpu_ratio']:.2f} | {floor} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every 16th document, a smaller model: seconds")
    parser.add_argument("--work-dir", type=Path, default=common.WORK / "kronfluence_agreement", help="cache of the model and corpus")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/kronfluence_agreement.json; --quick: a temp file)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", nargs="*", help="subset of ekfac kfac diagonal identity (default: all; ekfac with --model)")
    parser.add_argument("--model", help="a pretrained model (save_pretrained directory or .gguf) instead of the tiny trained one")
    parser.add_argument("--docs", type=int, default=64, help="with --model: documents of the real-models corpus both sides fit on")
    parser.add_argument("--batch-size", type=int, default=8, help="with --model: sequences per Kronfluence batch (x 64 tokens for the engine)")
    args = parser.parse_args(argv)
    if kronfluence_available():
        parser.error(kronfluence_available())
    if args.model is not None and args.quick:
        parser.error("--quick trains its own tiny model; leave out --model (or --quick)")
    if args.docs < 1 or args.batch_size < 1:
        parser.error("--docs and --batch-size must be positive")
    torch.set_num_threads(args.threads)
    mode_name = "quick" if args.quick else "default" if args.model is None else "pretrained"
    mode = MODES.get(mode_name, dict(every=None, max_length=64, batch_size=args.batch_size, model=None))
    strategies = args.strategies or (["ekfac"] if args.model is not None else None)
    facts = common.machine_facts()
    with common.Timer() as total:
        if args.model is None:
            documents = chatterbot_documents(("english",))
            documents = documents.take(np.arange(0, documents.num_rows, mode["every"]))
            model_dir, corpus_dir = common.prepare_trained_model(args.work_dir, documents, mode["model"], mode["max_length"])
        else:
            from influence.sources import resolve_model

            model_dir = resolve_model(args.model)
            args.work_dir.mkdir(parents=True, exist_ok=True)
            corpus_dir = real_corpus(model_dir, args.work_dir, args.docs, mode["max_length"])
        executor = LocalExecutor()
        scratch = Path(tempfile.mkdtemp(prefix="agreement-", dir=args.work_dir))
        try:  # an untimed identity fit loads the model into the executor's workspace, outside every timer
            fit_factors(model_dir, corpus_dir, scratch / "warm-up", FactorArgs(strategy="identity", progress=False), executor)
            results = []
            for strategy, fisher in SETTINGS:
                if strategies and strategy not in strategies:
                    continue
                results.append(run_setting(strategy, fisher, model_dir, corpus_dir, scratch, executor, mode["batch_size"],
                                           mode["max_length"], args.seed))
                r = results[-1]
                print(f"{strategy:8s} {fisher:9s} pearson {r['pearson']:.5f} fit {r['engine_fit_s']:.1f}s/{r['kronfluence_fit_s']:.1f}s "
                      f"score {r['engine_score_s']:.1f}s/{r['kronfluence_score_s']:.1f}s", flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    sequences, corpus = load_sequences(corpus_dir)
    described = describe_model(model_dir)
    source = ({"source": "chatterbot-corpus english", "every_kth_document": mode["every"]} if args.model is None else
              {"source": "real_models.documents: shutdown passages, chatterbot-corpus english, World English Bible verses",
               "first_documents": args.docs})
    model = ({**vars(mode["model"]), "parameters": described.parameters} if args.model is None else
             {"name": model_dir.name, "model_type": json.loads((model_dir / "config.json").read_text())["model_type"],
              "parameters": described.parameters, "modules": len(described.module_names)})
    report = {
        "benchmark": "kronfluence_agreement", "mode": mode_name,
        "settings": {"corpus": {**source, "num_documents": corpus["num_documents"], "num_sequences": sequences.num_rows,
                                "num_tokens": corpus["num_tokens"], "max_length": mode["max_length"]},
                     "model": model,
                     "modules": described.module_names, "queries": [q.query_id for q in QUERIES],
                     "dtype": "float32", "damping": "0.1 x mean(Lambda) per module, both sides",
                     "batch": f"Kronfluence {mode['batch_size']} sequences; engine {mode['batch_size'] * mode['max_length']} padded tokens",
                     "threads": args.threads, "seed": args.seed},
        "notes": {"kfac_scale": "the engine's K-FAC Lambda is l_S l_A^T times the mean tokens per sequence (the per-sequence scale of "
                                "EK-FAC); Kronfluence's is l_S l_A^T, so 'scale' is about 1 / mean tokens; rankings are unaffected",
                  "true_fisher": "each side draws its own sampled labels: agreement is limited by sampling noise, measured by "
                                 "engine_seed_to_seed (the engine fitted again with seed + 1, against itself)"},
        "results": results, "total_seconds": total.seconds, "machine": common.finish_machine(facts),
    }
    name = "kronfluence_agreement" if args.model is None else f"kronfluence_agreement_{model_dir.name}"
    out = common.write_results(args.out or common.default_out(name, args.quick), report,
                               common.command_line("kronfluence_agreement.py", argv))
    print(f"\n{markdown_table(results)}\n\nwrote {out} in {total.seconds:.0f}s")
    return report


if __name__ == "__main__":
    main()
