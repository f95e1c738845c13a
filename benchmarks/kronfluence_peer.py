"""Kronfluence (https://github.com/pomonam/kronfluence, 1.0.x) run with the engine's conventions, for side-by-side scores.

Conventions, matching the engine:

- training loss: the SUM over positions of next-token cross-entropy with the real labels (right padding ignored);
  for the fit with `fisher="true"` the labels are sampled from the model at the same positions (the true Fisher);
- measurement: the SUM of the completion tokens' negative log-likelihood, so that a positive score means that
  upweighting a training sequence raises log p(completion | prompt), the sign of the paper's I_f;
- damping None: Kronfluence's heuristic 0.1 x mean(Lambda) per module, the engine's default.

Install without letting pip touch the pinned torch (Kronfluence declares torchvision but never imports it):

    pip install --no-deps kronfluence accelerate einops einconv opt-einsum psutil safetensors
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import data

IGNORE_INDEX = -100
STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


def kronfluence_available() -> Optional[str]:
    """None when Kronfluence can be imported, else why not (the reason a benchmark reports when it skips it)."""
    if importlib.util.find_spec("kronfluence") is None:
        return "kronfluence is not installed; pip install --no-deps kronfluence accelerate einops einconv opt-einsum psutil safetensors"
    return None


class _Items(data.Dataset):
    """(input_ids, labels) pairs, labels aligned with the inputs (unshifted), -100 where there is no label."""

    def __init__(self, items: list[tuple[list[int], list[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> tuple[list[int], list[int]]:
        return self.items[idx]


def _collate(batch: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, label) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(label)] = torch.tensor(label)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _task(module_names: list[str]):
    from kronfluence.task import Task

    def shifted(batch: dict[str, torch.Tensor], model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            logits, labels = shifted(batch, model)
            if sample:  # the true Fisher: labels from the model's own predictive distribution
                with torch.no_grad():
                    sampled = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
                labels = torch.where(labels != IGNORE_INDEX, sampled, labels)
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            logits, labels = shifted(batch, model)  # prompt tokens carry -100: the completion's summed NLL
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")

        def get_influence_tracked_modules(self) -> list[str]:
            return list(module_names)

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            return batch["attention_mask"]

    return LanguageModelTask()


def run_kronfluence(model_dir: str, train_input_ids: list[list[int]], queries: list[tuple[list[int], list[int]]],
                    module_names: list[str], *, work_dir: str, strategy: str = "ekfac", fisher: str = "true",
                    damping: Optional[float] = None, dtype: torch.dtype = torch.float32, batch_size: int = 8,
                    seed: int = 0) -> dict[str, Any]:
    """Fit Kronfluence factors on `train_input_ids` and score every (prompt ids, completion ids) query against them.

    Returns {"scores": (queries, sequences) float64, "fit_seconds", "score_seconds", "fit_cpu_seconds",
    "score_cpu_seconds", "version"}; model loading is outside both timers.
    """
    import kronfluence
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    from transformers import AutoModelForCausalLM

    if strategy not in STRATEGIES or fisher not in ("true", "empirical"):
        raise ValueError(f"strategy must be one of {STRATEGIES} and fisher 'true' or 'empirical', got {strategy!r}, {fisher!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval().to(dtype=dtype)
    task = _task(module_names)
    model = prepare_model(model=model, task=task)
    train = _Items([(list(s), list(s)) for s in train_input_ids])
    query_items = _Items([(list(p) + list(c), [IGNORE_INDEX] * len(p) + list(c)) for p, c in queries])
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    analyzer = Analyzer(analysis_name="peer", model=model, task=task, cpu=True, disable_tqdm=True, disable_model_save=True,
                        output_dir=str(work_dir), log_level=logging.WARNING)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0, collate_fn=_collate))
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=fisher == "empirical", amp_dtype=None,
                                  covariance_max_examples=None, lambda_max_examples=None, activation_covariance_dtype=dtype,
                                  gradient_covariance_dtype=dtype, eigendecomposition_dtype=torch.float64,
                                  per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
    score_args = ScoreArguments(damping_factor=damping, amp_dtype=None, query_gradient_low_rank=None, per_sample_gradient_dtype=dtype,
                                precondition_dtype=dtype, score_dtype=dtype, query_gradient_svd_dtype=dtype)
    torch.manual_seed(seed)  # the sampled labels of the true Fisher
    start, cpu = time.perf_counter(), time.process_time()
    analyzer.fit_all_factors(factors_name=strategy, dataset=train, per_device_batch_size=batch_size, factor_args=factor_args,
                             overwrite_output_dir=True)
    fit_seconds, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    analyzer.compute_pairwise_scores(scores_name=strategy, factors_name=strategy, query_dataset=query_items, train_dataset=train,
                                     per_device_query_batch_size=min(batch_size, len(query_items)),
                                     per_device_train_batch_size=batch_size, score_args=score_args, overwrite_output_dir=True)
    score_seconds, score_cpu = time.perf_counter() - start, time.process_time() - cpu
    scores = analyzer.load_pairwise_scores(scores_name=strategy)["all_modules"].detach().double().cpu().numpy()
    if scores.shape != (len(query_items), len(train)):
        raise RuntimeError(f"Kronfluence returned scores of shape {scores.shape}, expected {(len(query_items), len(train))}")
    return {"scores": np.asarray(scores), "fit_seconds": fit_seconds, "score_seconds": score_seconds, "fit_cpu_seconds": fit_cpu,
            "score_cpu_seconds": score_cpu, "version": getattr(kronfluence, "__version__", "unknown")}
