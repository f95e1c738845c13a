"""Kronfluence peer runner for the agreement benchmark.

Runs Kronfluence (https://github.com/pomonam/kronfluence, 1.0.x) on a local Hugging Face causal LM
with exactly the conventions of our engine, so that its pairwise scores can be compared with ours
in the same run (see ``benchmarks/kronfluence_agreement.py``).

Conventions (must match the engine):

* Training loss: SUM over positions of next-token cross-entropy with the real labels; right padding,
  padded positions ignored.  For factor fitting (``sample=True``) the labels are sampled from the
  model's own predictive distribution at the same valid positions (true Fisher).
* Measurement: SUM of the negative log-probability of the completion tokens given everything before
  them.  Kronfluence scores ``grad(measurement)^T (F + damping)^-1 grad(train loss)``, so a positive
  score means upweighting the training document lowers the completion's NLL (= Grosse et al.'s
  ``I_f`` with ``f = log p``).
* Damping ``None`` -> Kronfluence's heuristic ``0.1 * mean(Lambda)`` per module (Lambda = corrected
  eigenvalues for EK-FAC, ``kron(eig_A, eig_S)`` for K-FAC, mean squared per-sequence gradient
  for the diagonal strategy).  A float is used as a fixed damping for every module.

Installing Kronfluence without letting pip touch torch::

    pip install --no-deps kronfluence==1.0.1 accelerate einops einconv opt-einsum psutil

(Kronfluence declares torchvision but never imports it; a PyPI torchvision breaks transformers.)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import data

IGNORE_INDEX = -100
STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


def _pad_batch(seqs: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    label_t = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
        label_t[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_t}


class _SeqDataset(data.Dataset):
    """Items are ``(input_ids, labels)``; labels are aligned with input_ids (unshifted), -100 = ignore."""

    def __init__(self, items: list[tuple[list[int], list[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> tuple[list[int], list[int]]:
        return self.items[idx]


def _make_collate(pad_id: int):
    def collate(batch: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return _pad_batch([b[0] for b in batch], [b[1] for b in batch], pad_id)

    return collate


def _make_task(module_names: list[str]):
    from kronfluence.task import Task

    class LMTask(Task):
        def _shifted(self, batch: dict[str, torch.Tensor], model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            ).logits
            shift_logits = logits[:, :-1, :].contiguous()
            shift_labels = batch["labels"][:, 1:].contiguous()
            return shift_logits, shift_labels

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            shift_logits, shift_labels = self._shifted(batch, model)
            flat_logits = shift_logits.view(-1, shift_logits.size(-1))
            flat_labels = shift_labels.view(-1)
            if sample:
                # True Fisher: labels drawn from the model's own predictive distribution,
                # at the same valid positions as the real labels.
                with torch.no_grad():
                    probs = torch.softmax(flat_logits.detach(), dim=-1)
                    sampled = torch.multinomial(probs, num_samples=1).flatten()
                    flat_labels = torch.where(flat_labels != IGNORE_INDEX, sampled, flat_labels)
            return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            # Labels already carry -100 on prompt tokens: summed NLL of the completion only.
            shift_logits, shift_labels = self._shifted(batch, model)
            return F.cross_entropy(
                shift_logits.view(-1, shift_logits.size(-1)),
                shift_labels.view(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )

        def get_influence_tracked_modules(self) -> list[str]:
            return list(module_names)

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            return batch["attention_mask"]

    return LMTask()


def run_kronfluence(
    model_dir: str,
    train_input_ids: list[list[int]],
    queries: list[tuple[list[int], list[int]]],
    module_names: list[str],
    strategy: str = "ekfac",
    damping: float | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    fisher: str = "true",
    *,
    work_dir: str,
    seed: int = 0,
) -> dict:
    """Fit Kronfluence factors on ``train_input_ids`` and score every query against every training sequence.

    ``fisher="true"`` samples the fit's labels from the model (Kronfluence's default, the paper's
    choice); ``"empirical"`` uses the real next tokens (``FactorArguments.use_empirical_fisher``).

    Returns ``{"scores": (num_queries, num_train) float64 array, "fit_seconds", "score_seconds",
    "fit_cpu_seconds", "score_cpu_seconds", "kronfluence_version"}`` (wall-clock and process CPU time).  The fit corpus is the training set itself (all sequences; no
    ``*_max_examples`` cap).
    """
    import kronfluence
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    from transformers import AutoModelForCausalLM

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if fisher not in ("true", "empirical"):
        raise ValueError(f"fisher must be 'true' (sampled labels) or 'empirical' (real labels), got {fisher!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError("dtype must be torch.float32 or torch.float64")
    if not train_input_ids or not queries:
        raise ValueError("need at least one training sequence and one query")

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = model.eval().to(device="cpu", dtype=dtype)
    pad_id = model.config.pad_token_id
    if pad_id is None:
        pad_id = 0  # value is irrelevant: padded positions are masked and carry label -100

    task = _make_task(module_names)
    model = prepare_model(model=model, task=task)

    train_items = [(list(s), list(s)) for s in train_input_ids]
    query_items = []
    for prompt, completion in queries:
        ids = list(prompt) + list(completion)
        labels = [IGNORE_INDEX] * len(prompt) + list(completion)
        query_items.append((ids, labels))
    train_ds = _SeqDataset(train_items)
    query_ds = _SeqDataset(query_items)

    out = Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    analyzer = Analyzer(
        analysis_name="kronfluence_peer",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        disable_model_save=True,
        output_dir=str(out),
        log_level=logging.WARNING,
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0, collate_fn=_make_collate(pad_id)))

    factor_args = FactorArguments(
        strategy=strategy,
        use_empirical_fisher=fisher == "empirical",
        amp_dtype=None,
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )
    score_args = ScoreArguments(
        damping_factor=damping,
        amp_dtype=None,
        query_gradient_low_rank=None,
        per_sample_gradient_dtype=dtype,
        precondition_dtype=dtype,
        score_dtype=dtype,
        query_gradient_svd_dtype=dtype,
    )

    bs = max(1, int(batch_size))
    torch.manual_seed(seed)  # label sampling for the true Fisher
    t0, c0 = time.perf_counter(), time.process_time()
    analyzer.fit_all_factors(
        factors_name=f"factors_{strategy}",
        dataset=train_ds,
        per_device_batch_size=bs,
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    fit_seconds, fit_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    analyzer.compute_pairwise_scores(
        scores_name=f"scores_{strategy}",
        factors_name=f"factors_{strategy}",
        query_dataset=query_ds,
        train_dataset=train_ds,
        per_device_query_batch_size=min(bs, len(query_items)),
        per_device_train_batch_size=bs,
        score_args=score_args,
        overwrite_output_dir=True,
    )
    score_seconds, score_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    scores = analyzer.load_pairwise_scores(scores_name=f"scores_{strategy}")["all_modules"]
    scores = scores.detach().to(torch.float64).cpu().numpy()
    if scores.shape != (len(query_items), len(train_items)):
        raise RuntimeError(f"unexpected score shape {scores.shape}")
    return {
        "scores": np.asarray(scores),
        "fit_seconds": float(fit_seconds),
        "score_seconds": float(score_seconds),
        "fit_cpu_seconds": float(fit_cpu_seconds),
        "score_cpu_seconds": float(score_cpu_seconds),
        "kronfluence_version": getattr(kronfluence, "__version__", "unknown"),
    }
