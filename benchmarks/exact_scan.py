"""What an exact scan costs on a real model (`influence score`, `compute_scores`): seconds per sequence against a bare
forward+backward loop over the same sequences, plain and with each of its optional outputs.

The exact scan is the answer a query's index cannot give when its `incomplete` flag is up (a real model's most
negative documents hide in the sketch's noise: `sketch_budget.py`), and the audit's per-query pass. Its variants:
`scores` (the default `ScoreArgs`: totals and per-module scores), `self_influence` (`--self-influence`: every token
rotated into the eigenbasis for ||W(z)||^2, which the index's doc table holds already) and `per_token`
(`--per-token`). Every variant scores the same rows against the same queries, in this process at one thread; the
rounds alternate the variants so that the machine's drift (tens of percent between hours here) falls on all of them,
and the median round is kept. Each call also pays a fixed part (the queries' gradients and their preconditioning,
the factors' load), timed in each round as the plain scan of one row: a sequence's cost is the rest over the others,
what a scan of a whole corpus pays per sequence. Each variant's largest difference from the plain scan's scores is recorded.

It reads a `real_models.py` run's directory (`<work-dir>/runs/<model>`) that has finished its fit: its model, corpus,
factors and queries.

    python benchmarks/real_models.py --models models --only smollm2-135m-instruct --docs 1000 --queries 3 \\
        --work-dir W ...                                                   # first: the run this reads
    python benchmarks/exact_scan.py --run W/runs/smollm2-135m-instruct --sequences 96
    python benchmarks/exact_scan.py --quick         # a tiny Llama's quick run, then this on it; a temp path
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (sets the environment before torch is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import real_models  # noqa: E402
from influence import ScoreArgs, compute_scores  # noqa: E402
from influence.artifacts import read_json  # noqa: E402
from influence.corpus import load_sequences  # noqa: E402
from influence.models import describe_model, load_tokenizer  # noqa: E402
from influence.stage import LocalExecutor  # noqa: E402

VARIANTS = {"scores": {}, "self_influence": {"self_influence": True}, "per_token": {"per_token": True}}


def middle_rows(num_rows: int, count: int) -> range:
    """`count` consecutive rows from the middle of the corpus (whose sources follow one another), all of them if fewer."""
    count = min(count, num_rows)
    start = (num_rows - count) // 2
    return range(start, start + count)


def scan_costs(run: Path, num_sequences: int, rounds: int, batch_tokens: int) -> dict:
    log = read_json(run / "stages.json")
    stages, identity = log["stages"], log["identity"]
    if "fit" not in stages:
        raise SystemExit(f"error: {run} has no finished fit; run its real_models.py command again with --resume "
                         f"(it keeps the stages it finished)")
    model_dir, corpus, factors = Path(identity["model_dir"]), run / "corpus", run / "factors"
    sequences, _ = load_sequences(corpus)
    rows = middle_rows(sequences.num_rows, num_sequences)
    queries = real_models.first_exchange_queries(real_models.load_documents_table(run / "documents.parquet"),
                                                 identity["settings"]["queries"], load_tokenizer(model_dir),
                                                 describe_model(model_dir).context)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bare = common.bare_forward_backward(model_dir, sequences.slice(rows.start, len(rows)), batch_tokens, repeats=2)
        seconds: dict[str, list[float]] = {name: [] for name in ("fixed", *VARIANTS)}
        results = {}
        executor = LocalExecutor()  # one process: the model is loaded once, and the first round's load is not timed
        one_row = range(rows.start, rows.start + 1)
        compute_scores(model_dir, factors, corpus, queries[:1], ScoreArgs(progress=False, batch_tokens=batch_tokens),
                       executor=executor, rows=one_row)
        for _ in range(rounds):
            with common.Timer() as timer:
                compute_scores(model_dir, factors, corpus, queries, ScoreArgs(progress=False, batch_tokens=batch_tokens),
                               executor=executor, rows=one_row)
            seconds["fixed"].append(timer.seconds)
            for name, options in VARIANTS.items():
                args = ScoreArgs(progress=False, batch_tokens=batch_tokens, **options)
                with common.Timer() as timer:
                    results[name] = compute_scores(model_dir, factors, corpus, queries, args, executor=executor, rows=rows)
                seconds[name].append(timer.seconds)
    finally:
        torch.set_num_threads(threads)
    plain = results["scores"].scores
    bare_per_sequence = bare["seconds"] / bare["sequences"]
    fixed = float(np.median(seconds.pop("fixed")))
    variants = {}
    for name, times in seconds.items():
        median = float(np.median(times))
        per_sequence = (median - fixed) / max(1, len(rows) - 1)
        variants[name] = {"seconds": median, "rounds": times, "seconds_per_sequence": per_sequence,
                          "in_bare_passes_per_sequence": per_sequence / bare_per_sequence,
                          # float32 sums in another order (per token): ~1e-6 of the largest score
                          "score_difference_from_plain": float(np.abs(results[name].scores - plain).max() / np.abs(plain).max())}
    return {"run": str(run), "model": identity["model"], "queries": len(queries), "sequences": len(rows),
            "rows": [rows.start, rows.stop], "tokens": int(sum(sequences.slice(rows.start, len(rows))["num_tokens"].to_pylist())),
            "batch_tokens": batch_tokens, "bare": bare, "bare_seconds_per_sequence": bare_per_sequence,
            "fixed_seconds": fixed, "fixed_in_bare_passes": fixed / bare_per_sequence, "variants": variants,
            "self_influence_over_plain": variants["self_influence"]["seconds_per_sequence"] / variants["scores"]["seconds_per_sequence"]}


def markdown(result: dict) -> str:
    lines = [f"{result['model']}: {result['sequences']} sequences, {result['queries']} queries, one thread; a bare "
             f"forward+backward pass {result['bare_seconds_per_sequence']:.3f} s per sequence; a scan's fixed part "
             f"{result['fixed_seconds']:.1f} s ({result['fixed_in_bare_passes']:.0f} passes)", "",
             "| scan | seconds (median of rounds) | per further sequence | in bare passes | max difference from the plain scan's scores, relative to the largest |",
             "|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['seconds']:.1f} | {v['seconds_per_sequence']:.3f} | {v['in_bare_passes_per_sequence']:.2f} | "
                     f"{v['score_difference_from_plain']:.1e} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a real_models.py run directory (<work-dir>/runs/<model>) with its fit")
    parser.add_argument("--sequences", type=int, default=96, help="consecutive sequences from the middle of the corpus")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant, alternating")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="a tiny Llama's quick real_models.py run, then this on it")
    parser.add_argument("--work-dir", type=Path, default=common.WORK / "exact_scan")
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args(argv)
    if ns.sequences < 1 or ns.rounds < 1:
        parser.error("--sequences and --rounds must be at least 1")
    facts = common.machine_facts()
    run = ns.run
    if ns.quick:
        run = real_models.quick_run(ns.work_dir)
    elif run is None or not (run / "stages.json").is_file():
        parser.error(f"--run must be a real_models.py run directory (with stages.json); got {run}")
    result = scan_costs(run.resolve(), ns.sequences, ns.rounds, ns.batch_tokens)
    common.publish("exact_scan.py", result, facts, markdown(result), ns.out, ns.quick, argv)
    return result


if __name__ == "__main__":
    main()
