"""Bergson (https://github.com/EleutherAI/bergson, 2.5.x) as a peer: a store of randomly projected gradients searched
with FAISS, run in a subprocess with its own site directory.

Bergson cannot combine EK-FAC with its projection or its FAISS search, so its store holds raw projected gradients,
scored by inner product and by cosine. Its FAISS path touches `faiss.GpuIndex`, so it needs the faiss-gpu-cu12 wheel
(which imports fine without a GPU); that wheel lives in its own directory, put first on the subprocess's path, so it
never shadows faiss-cpu for the engine. Install on CPU without touching torch:

    pip install --no-deps --target benchmarks/results/.work/bergson_site bergson==2.5.1 peft torchopt optree \\
        jaxtyping wadler-lindig natsort petname simple-parsing docstring-parser ml_dtypes \\
        faiss-gpu-cu12 nvidia-cuda-runtime-cu12 nvidia-cublas-cu12

`python benchmarks/bergson_peer.py SPEC.json` is the subprocess; `run_bergson` starts it and reads its results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

SITE = Path(__file__).resolve().parent / "results" / ".work" / "bergson_site"


def bergson_available(site: Path = SITE) -> Optional[str]:
    """None when Bergson is installed in `site`, else why it is skipped."""
    if not (Path(site) / "bergson").is_dir():
        return f"bergson is not installed in {site}; see benchmarks/bergson_peer.py for the install command"
    return None


def run_bergson(model_dir: Path, sequences: list[list[int]], queries: list[tuple[list[int], list[int]]], warmup: int,
                projection_dim: int, token_batch_size: int, top_k: int, work_dir: Path, threads: int, site: Path = SITE,
                timeout: float = 1800) -> dict[str, Any]:
    """Build a Bergson store over `sequences` and time its queries (the first `warmup` untimed) in a subprocess.

    Returns {"status": "ok", "versions", "build_seconds", "store_bytes_per_doc", "variants": {name: {"timings",
    "faiss_bytes_per_doc", "scores": (timed queries, sequences)}}}, or {"status": "failed"/"skipped", "reason"}.
    """
    import numpy as np

    if bergson_available(site):
        return {"status": "skipped", "reason": bergson_available(site)}
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    spec = {"site": str(site), "threads": threads, "model_dir": str(model_dir), "work_dir": str(work_dir), "module_regex": r"\.mlp\.",
            "projection_dim": projection_dim, "token_batch_size": token_batch_size, "sequences": sequences,
            "queries": [list(map(list, q)) for q in queries], "warmup": warmup, "top_k": top_k}
    (work_dir / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "WANDB_DISABLED": "true", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, str(work_dir / "spec.json")], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"the Bergson subprocess ran past {timeout}s"}
    if not (work_dir / "result.json").exists():
        return {"status": "failed", "reason": f"the Bergson subprocess exited {done.returncode} without a result", "stderr": done.stderr[-2000:]}
    result = json.loads((work_dir / "result.json").read_text())
    result["subprocess_seconds"] = time.perf_counter() - start
    for name, variant in result.get("variants", {}).items():
        variant["scores"] = np.load(work_dir / f"scores_{name}.npy")
    return result


def _worker(spec_path: str) -> None:
    """The subprocess: imports Bergson (and the faiss-gpu wheel) from the site directory, builds, queries, writes results."""
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["work_dir"])
    result: dict[str, Any] = {"status": "failed", "stage": "import"}
    sys.path.insert(0, spec["site"])
    try:
        import re
        import shutil

        import numpy as np
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(spec["threads"])
        import bergson
        import faiss
        from bergson.collection import collect_gradients
        from bergson.collector.collector import HookCollectorBase
        from bergson.collector.gradient_collectors import TraceCollector
        from bergson.config.config import FaissConfig, IndexConfig
        from bergson.data import allocate_batches
        from bergson.query.attributor import Attributor
        from bergson.utils.worker_utils import processor_for
        from datasets import Dataset
        from transformers import AutoModelForCausalLM

        result["versions"] = {"bergson": bergson.__version__, "faiss": faiss.__version__, "faiss_has_GpuIndex": hasattr(faiss, "GpuIndex")}
        result["stage"] = "build"
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
        base = model.base_model  # Bergson hooks the base model (module names without the "model." prefix)
        targets = {name for name in HookCollectorBase.discover_targets(base) if re.search(spec["module_regex"], name)}
        run_path = out_dir / "store"
        cfg = IndexConfig(run_path=str(run_path), model=spec["model_dir"], projection_dim=spec["projection_dim"],
                          token_batch_size=spec["token_batch_size"], loss_reduction="sum", precision="fp32")
        shutil.rmtree(run_path, ignore_errors=True)
        shutil.rmtree(cfg.partial_run_path, ignore_errors=True)
        cfg.partial_run_path.mkdir(parents=True)
        sequences = spec["sequences"]
        lengths = [len(s) for s in sequences]
        processor = processor_for(cfg)
        processor.save(cfg.partial_run_path)
        start = time.perf_counter()
        collect_gradients(model=model, data=Dataset.from_dict({"input_ids": sequences, "length": lengths}), processor=processor, cfg=cfg,
                          batches=allocate_batches(lengths, cfg.token_batch_size), target_modules=targets)
        result["build_seconds"] = time.perf_counter() - start
        shutil.move(str(cfg.partial_run_path), str(run_path))
        result["store_bytes_per_doc"] = (run_path / "gradients.bin").stat().st_size / len(sequences)
        result["tracked_modules"] = sorted(targets)

        def query_gradients(attributor, prompt: list[int], completion: list[int]) -> dict:
            """What `Attributor.trace` does, restricted to the tracked modules: the completion's summed NLL."""
            collector = TraceCollector(model=base, processor=attributor.processor, target_modules=targets, device="cpu", dtype=torch.float32)
            ids = torch.tensor([prompt + completion])
            labels = ids[:, 1:].clone()
            labels[:, : len(prompt) - 1] = -100
            with collector:
                logits = model(ids).logits[:, :-1]
                F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").backward()
            model.zero_grad(set_to_none=True)
            return {name: torch.cat(collector.mod_grads[name], dim=1) for name in attributor.ordered_modules}

        result["stage"], result["variants"] = "query", {}
        queries, warmup = spec["queries"], spec["warmup"]
        for variant, unit_norm in (("inner_product", False), ("cosine", True)):
            attributor = Attributor(run_path, device="cpu", unit_norm=unit_norm, faiss_cfg=FaissConfig(index_factory="Flat"))
            for prompt, completion in queries[:warmup]:
                attributor.search(query_gradients(attributor, prompt, completion), spec["top_k"])
            timings: dict[str, list[float]] = {"total": [], "gradient": [], "search": []}
            scores = np.zeros((len(queries) - warmup, len(sequences)))
            for qi, (prompt, completion) in enumerate(queries[warmup:]):
                tick = time.perf_counter()
                grads = query_gradients(attributor, prompt, completion)
                middle = time.perf_counter()
                attributor.search(grads, spec["top_k"])
                done = time.perf_counter()
                timings["gradient"].append(middle - tick)
                timings["search"].append(done - middle)
                timings["total"].append(done - tick)
                values, ids = attributor.search(grads, None)  # every document, for the agreement (untimed)
                scores[qi, ids[0].numpy()] = values[0].numpy()
            np.save(out_dir / f"scores_{variant}.npy", scores)
            faiss_dir = next(p for p in run_path.iterdir() if p.name.startswith("faiss_Flat") and ("cosine" in p.name) == unit_norm)
            result["variants"][variant] = {"timings": timings,
                                           "faiss_bytes_per_doc": sum(p.stat().st_size for p in faiss_dir.glob("*.faiss")) / len(sequences)}
        result["status"] = "ok"
        del result["stage"]
    except BaseException as exc:  # everything goes back to the parent as a reason
        result["reason"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc(limit=12)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    _worker(sys.argv[1])
