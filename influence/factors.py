"""EK-FAC factors: fit (two passes over the corpus, shardable), aggregate, save and load.

Per tracked module (Grosse et al. 2023, sec. 2.2):
  pass 1  A = E_tokens[a a^T], S = E_tokens[s s^T]   ->  A = Q_A diag(l_A) Q_A^T, S = Q_S diag(l_S) Q_S^T
  pass 2  Lambda_ij = E_seq[(Q_S^T G Q_A)_ij^2]        (EK-FAC eigenvalue correction)
Labels are sampled from the model (true Fisher) unless `fisher="empirical"`.

Strategies store what their preconditioner needs:
  identity  no basis, Lambda = 0, damping = 1      -> P(V) = V (plain gradient dot product)
  diagonal  no basis, Lambda = E_seq[G^2]          -> P(V) = V / (Lambda + damping)
  kfac      basis, Lambda = T_mean * l_S l_A^T     (T_mean = labelled tokens per sequence, so that
            Lambda approximates the per-sequence Fisher like the EK-FAC one does)
  ekfac     basis, Lambda corrected (pass 2)
Damping defaults to damping_scale x mean(Lambda) per module (the paper's 0.1).

Each pass is split into shards (contiguous row ranges): `fit_covariance_shard` and
`fit_eigenvalue_shard` write partial sums that `aggregate_*` reduce once all exist. That is the unit a
Ray worker runs; `fit_factors` runs every step in this process. Every step skips work already on disk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from influence import constants as C
from influence.arguments import FactorArgs
from influence.artifacts import load_tensors, read_json, read_manifest, require_same, save_tensors, write_json, write_manifest
from influence.corpus import iterate_batches, load_sequences, require_fits_context
from influence.errors import InfluenceError
from influence.gradients import capture_module_io, make_token_batch, rotated_gradients
from influence.models import TrackedModule, find_tracked_modules, fingerprint_model, load_model

LOG = logging.getLogger(__name__)
EIGENVECTORS_NAME = "eigenvectors.safetensors"


@dataclass
class ModuleFactors:
    """What the preconditioner of one module needs. Basis is None for identity and diagonal."""

    eigenvalues: torch.Tensor                  # (d_out, d_in) Lambda
    damping: float
    q_a: Optional[torch.Tensor] = None         # (d_in, d_in)
    q_s: Optional[torch.Tensor] = None         # (d_out, d_out)


@dataclass
class Factors:
    modules: dict[str, ModuleFactors]
    manifest: dict

    @property
    def strategy(self) -> str:
        return self.manifest["args"]["strategy"]

    def to(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> "Factors":
        def cast(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        modules = {n: ModuleFactors(cast(f.eigenvalues), f.damping, cast(f.q_a), cast(f.q_s)) for n, f in self.modules.items()}
        return Factors(modules, self.manifest)


def shard_rows(num_rows: int, shard: int, num_shards: int) -> range:
    """Contiguous rows of one shard; shards differ in size by at most one row."""
    if not 0 <= shard < num_shards:
        raise InfluenceError(f"shard {shard} is outside 0..{num_shards - 1}")
    return range(shard * num_rows // num_shards, (shard + 1) * num_rows // num_shards)


def _needs_basis(strategy: str) -> bool:
    return strategy in ("kfac", "ekfac")


class FitContext:
    """Model, tracked modules and sequences, loaded once per process (or per Ray worker)."""

    def __init__(self, model_dir: Path | str, corpus_dir: Path | str, args: FactorArgs):
        self.model_dir, self.corpus_dir, self.args = Path(model_dir), Path(corpus_dir), args
        self.model = load_model(model_dir, dtype=args.torch_dtype, device=args.device)
        self.modules: list[TrackedModule] = find_tracked_modules(self.model, args.module_pattern)
        self.sequences, corpus_manifest = load_sequences(corpus_dir)
        require_fits_context(self.sequences, self.model, corpus_dir)
        self.identity = {
            "model_fingerprint": fingerprint_model(model_dir),
            "corpus_fingerprint": corpus_manifest["corpus_fingerprint"],
            "modules": [m.name for m in self.modules],
            "args": args.artifact_dict(),
        }

    def start(self, out_dir: Path) -> None:
        """Record what this fit is built from, or refuse to resume a fit of something else."""
        path = out_dir / C.ARGS_NAME
        if path.exists():
            saved = read_json(path)
            for key in ("model_fingerprint", "corpus_fingerprint", "modules"):
                require_same(key, self.identity[key], saved.get(key), out_dir, "use a new --out directory for another model or corpus")
            self.args.require_matches(saved["args"], str(out_dir))
        else:
            write_json(path, self.identity)

    def batches(self, rows: range, desc: str):
        total = -(-len(rows) // self.args.batch_size)
        for seq_ids, ids in tqdm(iterate_batches(self.sequences, self.args.batch_size, rows), total=total, desc=desc,
                                 unit="batch", disable=not self.args.progress):
            yield make_token_batch(ids, seq_ids=seq_ids, device=self.args.device)

    def capture(self, batch):
        seed = None if self.args.fisher == "empirical" else self.args.seed
        io, _ = capture_module_io(self.model, self.modules, batch, sample_seed=seed)
        return io


def fit_covariance_shard(ctx: FitContext, out_dir: Path, shard: int = 0, num_shards: int = 1) -> Path:
    """Pass 1 over one shard: sums of a a^T and s s^T, and token counts."""
    path = out_dir / C.COVARIANCE_SHARD_NAME.format(shard=shard, num_shards=num_shards)
    if path.exists():
        return path
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(3, dtype=torch.float64)  # tokens, labelled tokens, sequences
    for batch in ctx.batches(shard_rows(ctx.sequences.num_rows, shard, num_shards), f"covariance {shard}/{num_shards}"):
        for name, (a, s) in ctx.capture(batch).items():
            a2, s2 = a.flatten(0, 1), s.flatten(0, 1)  # (tokens, d_in), (tokens, d_out)
            _accumulate(sums, name + C.ACTIVATION_SUM, (a2.T @ a2).double())
            _accumulate(sums, name + C.GRADIENT_SUM, (s2.T @ s2).double())
        counts += torch.tensor([batch.attention_mask.sum(), batch.label_mask.sum(), len(batch.input_ids)], dtype=torch.float64)
    save_tensors(path, {**sums, "counts": counts})
    return path


def fit_eigenvalue_shard(ctx: FitContext, out_dir: Path, shard: int = 0, num_shards: int = 1) -> Path:
    """Pass 2 over one shard: sum over sequences of (Q_S^T G Q_A)^2 (G^2 for diagonal)."""
    path = out_dir / C.EIGENVALUE_SHARD_NAME.format(shard=shard, num_shards=num_shards)
    if path.exists():
        return path
    basis = _load_basis(out_dir, ctx) if _needs_basis(ctx.args.strategy) else {}
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros(1, dtype=torch.float64)
    for batch in ctx.batches(shard_rows(ctx.sequences.num_rows, shard, num_shards), f"eigenvalues {shard}/{num_shards}"):
        for name, (a, s) in ctx.capture(batch).items():
            q_a, q_s = basis.get(name, (None, None))
            rotated = rotated_gradients(a, s, q_a, q_s)  # (batch, d_out, d_in)
            _accumulate(sums, name + C.EIGENVALUE_SUM, rotated.double().pow(2).sum(0))
        count += len(batch.input_ids)
    save_tensors(path, {**sums, "count": count})
    return path


def aggregate_covariances(ctx: FitContext, out_dir: Path, num_shards: int) -> Path:
    """Sum pass-1 shards and eigendecompose A and S (float64) into the basis pass 2 needs."""
    path = out_dir / EIGENVECTORS_NAME
    if path.exists():
        return path
    total = _sum_shards(out_dir, C.COVARIANCE_SHARD_NAME, num_shards)
    num_tokens, num_labelled, num_sequences = total.pop("counts").tolist()
    result = {"counts": torch.tensor([num_tokens, num_labelled, num_sequences], dtype=torch.float64)}
    for module in ctx.modules:
        activation = total[module.name + C.ACTIVATION_SUM] / max(num_tokens, 1.0)
        gradient = total[module.name + C.GRADIENT_SUM] / max(num_labelled, 1.0)
        l_a, q_a = torch.linalg.eigh(activation)
        l_s, q_s = torch.linalg.eigh(gradient)
        result.update({
            module.name + C.ACTIVATION_EIGENVECTORS: q_a, module.name + ".activation_eigenvalues": l_a.clamp_min(0),
            module.name + C.GRADIENT_EIGENVECTORS: q_s, module.name + ".gradient_eigenvalues": l_s.clamp_min(0),
        })
    save_tensors(path, result)
    return path


def aggregate_factors(ctx: FitContext, out_dir: Path, num_shards: int) -> Path:
    """Form each strategy's Lambda and damping, write factors.safetensors and the manifest."""
    strategy, tensors = ctx.args.strategy, {}
    basis = load_tensors(out_dir / EIGENVECTORS_NAME) if _needs_basis(strategy) else {}
    corrected = _sum_shards(out_dir, C.EIGENVALUE_SHARD_NAME, num_shards) if strategy in ("diagonal", "ekfac") else {}
    for module in ctx.modules:
        name = module.name
        if strategy == "identity":
            eigenvalues = torch.zeros(module.shape, dtype=torch.float64)
        elif strategy == "kfac":
            _, num_labelled, num_sequences = basis["counts"].tolist()
            outer = torch.outer(basis[name + ".gradient_eigenvalues"], basis[name + ".activation_eigenvalues"])
            eigenvalues = outer * (num_labelled / num_sequences)
        else:
            eigenvalues = corrected[name + C.EIGENVALUE_SUM] / corrected["count"]
        if strategy == "identity":
            damping = 1.0
        else:
            damping = ctx.args.damping if ctx.args.damping is not None else ctx.args.damping_scale * float(eigenvalues.mean())
            if damping <= 0:
                raise InfluenceError(f"module {name} has all-zero curvature, so the heuristic damping is 0; pass a fixed --damping")
        tensors[name + C.EIGENVALUES] = eigenvalues
        tensors[name + C.DAMPING] = torch.tensor(damping, dtype=torch.float64)
        if _needs_basis(strategy):
            tensors[name + C.ACTIVATION_EIGENVECTORS] = basis[name + C.ACTIVATION_EIGENVECTORS]
            tensors[name + C.GRADIENT_EIGENVECTORS] = basis[name + C.GRADIENT_EIGENVECTORS]
    save_tensors(out_dir / C.FACTORS_NAME, tensors)
    return write_manifest(out_dir, "factors", **ctx.identity, model_dir=str(ctx.model_dir.resolve()),
                          corpus_dir=str(ctx.corpus_dir.resolve()), num_shards=num_shards)


def fit_factors(model_dir: Path | str, corpus_dir: Path | str, out_dir: Path | str, args: FactorArgs = FactorArgs(),
                num_shards: int = 1, context: Optional[FitContext] = None) -> Path:
    """Fit the factors of `args.strategy` over the whole corpus in this process; returns `out_dir`.

    Re-running resumes from the shards on disk; a finished fit is returned as is.
    """
    out_dir = Path(out_dir)
    ctx = context or FitContext(model_dir, corpus_dir, args)
    ctx.start(out_dir)
    if (out_dir / C.MANIFEST_NAME).exists():
        return out_dir
    start = time.perf_counter()
    if _needs_basis(args.strategy):
        for shard in range(num_shards):
            fit_covariance_shard(ctx, out_dir, shard, num_shards)
        aggregate_covariances(ctx, out_dir, num_shards)
    if args.strategy in ("diagonal", "ekfac"):
        for shard in range(num_shards):
            fit_eigenvalue_shard(ctx, out_dir, shard, num_shards)
    aggregate_factors(ctx, out_dir, num_shards)
    LOG.info("fit %s factors for %d modules over %d sequences in %.1fs", args.strategy, len(ctx.modules),
             ctx.sequences.num_rows, time.perf_counter() - start)
    return out_dir


def load_factors(factors_dir: Path | str, model_dir: Path | str | None = None) -> Factors:
    """Load fitted factors; with `model_dir`, refuse factors fitted on another model."""
    factors_dir = Path(factors_dir)
    manifest = read_manifest(factors_dir, "factors")
    if model_dir is not None:
        require_same("model", fingerprint_model(model_dir), manifest["model_fingerprint"], factors_dir,
                     "fit factors for this model with `influence fit`, or pass the model they were fitted on")
    tensors = load_tensors(factors_dir / C.FACTORS_NAME)
    modules = {}
    for name in manifest["modules"]:
        try:
            modules[name] = ModuleFactors(
                eigenvalues=tensors[name + C.EIGENVALUES],
                damping=float(tensors[name + C.DAMPING]),
                q_a=tensors.get(name + C.ACTIVATION_EIGENVECTORS),
                q_s=tensors.get(name + C.GRADIENT_EIGENVECTORS),
            )
        except KeyError as exc:
            raise InfluenceError(f"{factors_dir / C.FACTORS_NAME} lacks {exc.args[0]}; the manifest was edited or the file is from another fit; re-run `influence fit`") from exc
    return Factors(modules, manifest)


def _accumulate(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value.clone()


def _sum_shards(out_dir: Path, pattern: str, num_shards: int) -> dict[str, torch.Tensor]:
    missing = [k for k in range(num_shards) if not (out_dir / pattern.format(shard=k, num_shards=num_shards)).exists()]
    if missing:
        raise InfluenceError(f"{out_dir} lacks shards {missing[:8]} of {num_shards}; run them before aggregating")
    total: dict[str, torch.Tensor] = {}
    for shard in range(num_shards):
        for key, value in load_tensors(out_dir / pattern.format(shard=shard, num_shards=num_shards)).items():
            _accumulate(total, key, value)
    return total


def _load_basis(out_dir: Path, ctx: FitContext) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tensors = load_tensors(out_dir / EIGENVECTORS_NAME)
    dtype = ctx.args.torch_dtype if ctx.args.torch_dtype in (torch.float32, torch.float64) else torch.float32
    return {m.name: (tensors[m.name + C.ACTIVATION_EIGENVECTORS].to(ctx.args.device, dtype),
                     tensors[m.name + C.GRADIENT_EIGENVECTORS].to(ctx.args.device, dtype)) for m in ctx.modules}
