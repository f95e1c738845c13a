"""EK-FAC factors: the fit stage (two passes over the corpus, sharded and resumable), and loading the result.

Per tracked module (Grosse et al. 2023, sec. 2.2):
  pass 1  A = E_tokens[a a^T], S = E_tokens[s s^T]   ->  A = Q_A diag(l_A) Q_A^T, S = Q_S diag(l_S) Q_S^T
          (the eigendecompositions are a pass of their own, one task per matrix: `influence.eigenbasis`)
  pass 2  Lambda_ij = E_seq[(Q_S^T G Q_A)_ij^2]        (EK-FAC eigenvalue correction)
Labels are sampled from the model (true Fisher) unless `fisher="empirical"`, each pass its own draw (`eigenvalue_label_seed`).

Strategies store what their preconditioner needs:
  identity  no basis, Lambda = 0, damping = 1      -> P(V) = V (plain gradient dot product)
  diagonal  no basis, Lambda = E_seq[G^2]          -> P(V) = V / (Lambda + damping)
  kfac      basis, Lambda = T_mean * l_S l_A^T     (T_mean = labelled tokens per sequence, so that
            Lambda approximates the per-sequence Fisher like the EK-FAC one does)
  ekfac     basis, Lambda corrected (pass 2)
Damping defaults to damping_scale x mean(Lambda) per module (the paper's 0.1).

A pass splits the corpus into shards (tasks of about 32 batches, at least one per worker) and adds their
sums on the driver, in shard order, into one file per pass (`PassSums`): a fit's disk use does not grow with its
workers, its bar moves shard by shard, and a killed fit resumes from the shards summed when it was last saved.

On disk, a finished fit is `factors.safetensors` (per module: Q_A, Q_S, Lambda, damping, and the eigenvalues l_A, l_S
of A and S; float32, or float64 for a float64 fit) and its manifest: about 4 (d_in^2 + d_out^2 + d_out d_in) bytes per
module in float32. The passes' sums and
the eigenvectors of pass 1 exist only while the fit can resume, and are removed once the manifest is written.
The factors may be fitted on a sample of the corpus, or on another corpus cut by the same tokenizer: the manifest
records which.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from influence import constants as C
from influence.arguments import FactorArgs
from influence.artifacts import (file_fingerprint, load_tensors, read_json, read_manifest, read_only_tensor, references, require_same,
                                 require_same_plan, save_tensors, write_json, write_manifest)
from influence.corpus import TokenRows, load_sequences, require_fits_context, require_same_tokenizer, shard_rows, token_rows
from influence.eigenbasis import eigendecomposition_pass, load_basis, packed_symmetric
from influence.errors import InfluenceError
from influence.gradients import capture_module_io, make_token_batch, plan_model_batches, rotated_gradient_blocks
from influence.models import ModelInfo, ModelSpec, describe_model, load_model_context, model_identity, require_model_dir
from influence.outputs import check_existing, prepare_output
from influence.stage import Executor, Pass, Workspace, run_stage

LOG = logging.getLogger(__name__)

# How the fit's passes draw sampled labels, saved with its plan: before version 2 the eigenvalue pass reused the
# covariance pass's draw, so a fit started then and resumed now would mix two kinds of eigenvalue shards.
LABEL_DRAWS = 2


@dataclass
class ModuleFactors:
    """What the preconditioner of one module needs. Basis is None for identity and diagonal.

    Pickled (e.g. shipped to Ray workers), CPU tensors travel as numpy arrays: Ray shares those between the workers of
    a node, read in place from its object store, where it would copy a tensor into every worker (the factors are the
    largest thing a stage ships: 1.3 GB for SmolLM2-135M). Such tensors are views of memory other workers read, so no
    code may modify factors in place.
    """

    eigenvalues: torch.Tensor                  # (d_out, d_in) Lambda
    damping: float
    q_a: Optional[torch.Tensor] = None         # (d_in, d_in)
    q_s: Optional[torch.Tensor] = None         # (d_out, d_out)

    def __reduce__(self):
        return _module_factors, (_shareable(self.eigenvalues), self.damping, _shareable(self.q_a), _shareable(self.q_s))


def _shareable(tensor: Optional[torch.Tensor]):
    """A CPU tensor's numpy view (what Ray can share without copying); other tensors (GPU, bfloat16) as they are."""
    if tensor is None or tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor
    return tensor.detach().numpy()


def _module_factors(eigenvalues, damping: float, q_a, q_s) -> ModuleFactors:
    def tensor(value):
        return read_only_tensor(value) if isinstance(value, np.ndarray) else value
    return ModuleFactors(tensor(eigenvalues), damping, tensor(q_a), tensor(q_s))


@dataclass
class Factors:
    modules: dict[str, ModuleFactors]
    manifest: dict

    @property
    def strategy(self) -> str:
        return self.manifest["args"]["strategy"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["factors_fingerprint"]

    def to(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> "Factors":
        def cast(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        modules = {n: ModuleFactors(cast(f.eigenvalues), f.damping, cast(f.q_a), cast(f.q_s)) for n, f in self.modules.items()}
        return Factors(modules, self.manifest)


def needs_basis(strategy: str) -> bool:
    return strategy in ("kfac", "ekfac")


def needs_corrected_eigenvalues(strategy: str) -> bool:
    return strategy in ("diagonal", "ekfac")


@dataclass
class FitPlan:
    """Everything a fit is built from, checked before anything is written."""

    model_dir: Path
    corpus_dir: Path
    out_dir: Path
    args: FactorArgs
    info: ModelInfo
    spec: ModelSpec
    sequences: pa.Table
    identity: dict       # saved as args.json: compared when resuming
    num_shards: int

    def sums(self, name: str) -> "PassSums":
        return PassSums(self.out_dir / name, self.num_shards)

    def rows(self, shard: int) -> TokenRows:
        return token_rows(self.sequences, shard_rows(self.sequences.num_rows, shard, self.num_shards))

    def sizes(self, shards: Iterable[int]) -> list[int]:
        return [len(shard_rows(self.sequences.num_rows, k, self.num_shards)) for k in shards]


class PassSums:
    """A pass's sums over its shards, added on the driver in shard order and saved to one file as they grow.

    In shard order (a result that arrives early waits for the ones before it), a fit adds the same numbers in the same
    order however many workers ran it and wherever it was interrupted, so a resumed fit equals an uninterrupted one
    bit for bit. The file is rewritten once the time since its last write is ten times what that write took: saving
    costs at most a tenth of the pass whatever the model's size, and a killed fit loses only the shards summed since.
    """

    def __init__(self, path: Path, num_shards: int) -> None:
        self.path, self.num_shards = path, num_shards
        self.sums: dict[str, torch.Tensor] = {}
        self.done = 0
        if path.exists():
            self.sums = load_tensors(path)
            summed = self.sums.pop(C.SUMMED_SHARDS, None)
            if summed is None or summed.tolist()[1] != num_shards:
                raise InfluenceError(f"{path} holds the sums of another split of the corpus than this fit's {num_shards} shards "
                                     f"(args.json was edited?); delete {path.parent} and run the fit again")
            self.done = int(summed[0])
        self.waiting: dict[int, dict[str, np.ndarray]] = {}
        self.saved_done, self.saved_at, self.save_seconds = self.done, time.monotonic(), 0.0

    def pending(self) -> list[int]:
        return list(range(self.done, self.num_shards))

    def add(self, shard: int, sums: dict[str, np.ndarray]) -> None:
        self.waiting[shard] = sums
        while self.done in self.waiting:
            for key, value in self.waiting.pop(self.done).items():
                _accumulate(self.sums, key, read_only_tensor(value))
            self.done += 1
        due = time.monotonic() - self.saved_at >= 10 * self.save_seconds
        if self.done > self.saved_done and (due or self.done == self.num_shards):
            self.save()

    def save(self) -> None:
        start = time.monotonic()
        save_tensors(self.path, {**self.sums, C.SUMMED_SHARDS: torch.tensor([self.done, self.num_shards])})
        self.saved_done, self.saved_at = self.done, time.monotonic()
        self.save_seconds = self.saved_at - start

    def total(self) -> dict[str, torch.Tensor]:
        """The sums over every shard (the pass must be finished)."""
        if self.done < self.num_shards:
            raise InfluenceError(f"{self.path} holds {self.done} of {self.num_shards} shards' sums; re-run the fit to finish them")
        return self.sums


def default_num_shards(sequences: pa.Table, batch_tokens: int, workers: int) -> int:
    """Shards per pass when not asked: about 32 batches each, at least one per worker. A shard's sums (a module's
    d_in^2 + d_out^2 numbers, as much as the work on one token) cross to the driver, are added and saved, and its last
    batch is a part one that costs a whole batch's sums: 32 batches make that a few percent. (8 batches each made
    SmolLM2's fit of 1,209 sequences on two workers 24% slower than 2 shards.)"""
    batches = int(pc.sum(pc.list_value_length(sequences["input_ids"])).as_py() or 0) / batch_tokens
    return max(1, min(sequences.num_rows, max(math.ceil(batches / 32), workers)))


@dataclass(frozen=True)
class FitWork:
    """What every task of a fit pass shares: the model to load and the fit's settings (plus pass 2's basis)."""

    spec: ModelSpec
    fisher: str
    seed: int
    batch_tokens: int
    basis: Optional[dict] = None     # pass 2: {module: (Q_A, Q_S)} as numpy arrays
    basis_key: Optional[tuple] = None


def plan_fit(model_dir: Path | str, corpus_dir: Path | str, out_dir: Path | str, args: FactorArgs = FactorArgs(),
             num_shards: Optional[int] = None, workers: int = 1) -> FitPlan:
    """Check the inputs and the output directory, and decide the shards (a resumed fit keeps its saved shard count;
    by default `default_num_shards` for `workers`)."""
    model_dir, corpus_dir, out_dir = require_model_dir(model_dir), Path(corpus_dir).resolve(), Path(out_dir).resolve()
    if num_shards is not None and (isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1):
        raise InfluenceError(f"--num-shards must be at least 1, got {num_shards!r}; pass a positive number")
    info = describe_model(model_dir, args.module_pattern)
    sequences, corpus_manifest = load_sequences(corpus_dir)
    require_same_tokenizer(corpus_manifest, model_dir, corpus_dir)
    require_fits_context(sequences, info.context, corpus_dir)
    identity = model_identity(model_dir)
    check_existing(out_dir, "factors", {"model": model_dir, "corpus": corpus_dir})  # before trusting what it holds
    saved = read_json(out_dir / C.ARGS_NAME) if (out_dir / C.ARGS_NAME).is_file() else None
    plan_identity = {"model_fingerprint": identity.fingerprint, "corpus_fingerprint": corpus_manifest["corpus_fingerprint"],
                     "tokenizer_fingerprint": corpus_manifest["tokenizer_fingerprint"], "modules": info.module_names,
                     "args": args.artifact_dict(), "label_draws": LABEL_DRAWS}
    if saved is not None and _has_finished_work(out_dir):
        require_same_plan(saved, out_dir / C.ARGS_NAME, plan_identity, ("model_fingerprint", "corpus_fingerprint", "modules"),
                          out_dir, "model, corpus or module pattern", args)
        _require_same_label_draws(saved, out_dir, args)
        if num_shards is not None and num_shards != saved.get("num_shards"):
            LOG.warning("resuming %s with its saved %s shards (not %d)", out_dir, saved.get("num_shards"), num_shards)
        num_shards = int(saved["num_shards"])
    num_shards = min(num_shards or default_num_shards(sequences, args.batch_tokens, workers), sequences.num_rows)
    spec = ModelSpec(str(model_dir), args.dtype, args.device, args.module_pattern, identity.quick)
    return FitPlan(model_dir, corpus_dir, out_dir, args, info, spec, sequences, {**plan_identity, "num_shards": num_shards}, num_shards)


def _require_same_label_draws(saved: dict, out_dir: Path, args: FactorArgs) -> None:
    """Refuse to resume or return a true-Fisher EK-FAC fit whose eigenvalue pass drew labels the old way (version 1).
    (Other strategies sample labels in one pass at most: their old shards are as valid as new ones.)"""
    if args.fisher != "true" or args.strategy != "ekfac" or saved.get("label_draws", 1) == LABEL_DRAWS:
        return
    if (out_dir / C.EIGENVALUE_SUMS_NAME).exists() or any(out_dir.glob("eigenvalue_shard_*")) or (out_dir / C.MANIFEST_NAME).exists():
        raise InfluenceError(
            f"{out_dir} holds eigenvalues fitted without a record of how they drew their labels: an older version's "
            f"eigenvalue pass reused the covariance pass's sampled labels (an in-sample Lambda that inflates scores); "
            f"delete {out_dir} and run the fit again")


def _has_finished_work(out_dir: Path) -> bool:
    """Whether an earlier attempt left shards worth resuming (else its saved settings need not bind a retry)."""
    return (any(out_dir.glob(C.OLD_SHARD_PATTERN)) or any((out_dir / name).exists() for name in
            (C.COVARIANCE_SUMS_NAME, C.EIGENVALUE_SUMS_NAME, C.EIGENVECTORS_NAME, C.MANIFEST_NAME)))


def fit_factors(model_dir: Path | str, corpus_dir: Path | str, out_dir: Path | str, args: FactorArgs = FactorArgs(),
                executor: Optional[Executor] = None, num_shards: Optional[int] = None) -> Path:
    """Fit the factors of `args.strategy` over the corpus on `executor` (default: this process); returns `out_dir`.

    The corpus is split into `num_shards` shards (default: `default_num_shards`); re-running resumes from the sums
    saved on disk, and a finished fit is returned as is.
    """
    plan = plan_fit(model_dir, corpus_dir, out_dir, args, num_shards, getattr(executor, "workers", 1))
    if (plan.out_dir / C.MANIFEST_NAME).exists():
        read_manifest(plan.out_dir, "factors")
        if not args.keep_shards:  # a fit killed between its manifest and the clean-up
            _remove_intermediates(plan)
        return plan.out_dir
    bytes_needed = _sums_bytes(plan) * 2  # each pass's sums, and the temporary copy a save writes
    with prepare_output(plan.out_dir, "factors", {"model": plan.model_dir, "corpus": plan.corpus_dir}, bytes_needed):
        _remove_old_shards(plan)
        write_json(plan.out_dir / C.ARGS_NAME, plan.identity)
        run_stage("fit", fit_passes(plan), executor, args.progress)
    return plan.out_dir


def _remove_old_shards(plan: FitPlan) -> None:
    """An earlier version saved one file per pass shard; this one cannot resume from them, and they would hold the
    disk that its own sums need."""
    old = sorted(plan.out_dir.glob(C.OLD_SHARD_PATTERN))
    if old:
        LOG.warning("%s holds %d pass shards of an earlier version, which this version cannot resume from: removed; "
                    "their passes run again", plan.out_dir, len(old))
        for path in old:
            path.unlink()


def _sums_bytes(plan: FitPlan) -> int:
    """float64 bytes of the two passes' sums: what the fit writes while it runs (the space check's estimate)."""
    return sum(8 * (d_in * (d_in + 1) // 2 + d_out * (d_out + 1) // 2 + d_out * d_in) for _, (d_out, d_in) in plan.info.modules)


def fit_passes(plan: FitPlan) -> Iterator[Pass]:
    """The fit as passes: covariances, their eigenvectors; eigenvalue corrections; the factors."""
    args = plan.args
    work = FitWork(plan.spec, args.fisher, args.seed, args.batch_tokens)
    key = ("fit", plan.spec, args.fisher, args.seed, args.batch_tokens)
    if needs_basis(args.strategy) and not (plan.out_dir / C.EIGENVECTORS_NAME).exists():
        covariance = plan.sums(C.COVARIANCE_SUMS_NAME)
        yield _summing_pass(plan, "covariance", covariance, covariance_work, work, key)
        storage = "float64" if _storage_dtype(args) == torch.float64 else "float32"
        yield eigendecomposition_pass(covariance.total(), plan.info.module_names, plan.spec.device,
                                      storage, plan.out_dir / C.EIGENVECTORS_NAME)
        del covariance  # the eigendecompositions hold what they need
    if needs_corrected_eigenvalues(args.strategy):
        basis = load_basis(plan.out_dir / C.EIGENVECTORS_NAME, plan.info.module_names) if needs_basis(args.strategy) else None
        basis_key = (str(plan.out_dir), (plan.out_dir / C.EIGENVECTORS_NAME).stat().st_mtime_ns) if basis else None
        seed = eigenvalue_label_seed(args.seed)
        yield _summing_pass(plan, "eigenvalues", plan.sums(C.EIGENVALUE_SUMS_NAME), eigenvalue_work,
                            FitWork(plan.spec, args.fisher, seed, args.batch_tokens, basis, basis_key), (*key, seed, basis_key))
    yield Pass("factors", [], _no_work, _no_save, reduce=partial(aggregate_factors, plan))


def _summing_pass(plan: FitPlan, name: str, sums: PassSums, work, shared: FitWork, shared_key: tuple) -> Pass:
    pending = sums.pending()
    return Pass(name, pending, work, save=sums.add, payload=plan.rows, shared=shared, shared_key=shared_key,
                sizes=plan.sizes(pending), done=sum(plan.sizes(range(sums.done))), in_order=True)


def eigenvalue_label_seed(seed: int) -> int:
    """The seed of the labels the eigenvalue pass samples (true Fisher): another draw than the covariance pass's.

    With the covariance pass's own labels, Lambda would be measured on the very gradients the eigenbasis was fitted
    to, an in-sample estimate that concentrates in the top eigenvectors: on SmolLM2 and 64 sequences it made scores
    2.4 times Kronfluence's (which samples afresh in each pass), while both agree exactly with real labels.
    """
    digest = hashlib.blake2b(f"{int(seed)}:eigenvalue-labels".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")  # 32 bits: the per-sequence generator seeds seed * 1_000_003 + seq_id fit in 64


def _no_work(workspace, shared, payload):  # a pass that only reduces
    return None


def _no_save(task, result) -> None:
    return None


def _token_batches(workspace: Workspace, work: FitWork, rows: TokenRows):
    loaded = workspace.get(("model", work.spec), partial(load_model_context, work.spec))
    for positions in plan_model_batches(rows.lengths, work.batch_tokens, loaded.modules):
        yield make_token_batch([rows.sequence(i) for i in positions], seq_ids=[int(rows.seq_ids[i]) for i in positions],
                               device=work.spec.device)


def _capture(workspace: Workspace, work: FitWork, batch):
    loaded = workspace.get(("model", work.spec), partial(load_model_context, work.spec))
    seed = None if work.fisher == "empirical" else work.seed
    io, _ = capture_module_io(loaded.model, loaded.modules, batch, sample_seed=seed)
    return io


def covariance_work(workspace: Workspace, work: FitWork, rows: TokenRows) -> dict[str, np.ndarray]:
    """Pass 1 over one shard: sums of a a^T and s s^T (float64, their upper triangles: `packed_symmetric`), and token
    counts."""
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(3, dtype=torch.float64)  # tokens, labelled tokens, sequences
    for batch in _token_batches(workspace, work, rows):
        for name, (a, s) in _capture(workspace, work, batch).items():
            a2, s2 = a.flatten(0, 1), s.flatten(0, 1)  # (tokens, d_in), (tokens, d_out)
            _accumulate(sums, name + C.ACTIVATION_SUM, packed_symmetric(a2.T @ a2).double().cpu())
            _accumulate(sums, name + C.GRADIENT_SUM, packed_symmetric(s2.T @ s2).double().cpu())
        counts += torch.tensor([batch.attention_mask.sum(), batch.label_mask.sum(), len(batch.input_ids)], dtype=torch.float64)
    return {**{k: v.numpy() for k, v in sums.items()}, C.COUNTS: counts.numpy()}


def eigenvalue_work(workspace: Workspace, work: FitWork, rows: TokenRows) -> dict[str, np.ndarray]:
    """Pass 2 over one shard: the sum over sequences of (Q_S^T G Q_A)^2 (G^2 for diagonal)."""
    dtype = torch.float64 if work.spec.dtype == "float64" else torch.float32
    basis = {}
    if work.basis is not None:
        basis = workspace.get(("basis", work.basis_key, work.spec), lambda: {
            name: (read_only_tensor(q_a).to(work.spec.device, dtype), read_only_tensor(q_s).to(work.spec.device, dtype))
            for name, (q_a, q_s) in work.basis.items()})
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros(1, dtype=torch.float64)
    for batch in _token_batches(workspace, work, rows):
        for name, (a, s) in _capture(workspace, work, batch).items():
            q_a, q_s = basis.get(name, (None, None))
            # a batch's sum in its own dtype (a few dozen sequences), block by block; the running sum in float64
            squares = torch.empty(s.shape[-1], a.shape[-1], dtype=dtype, device=a.device)
            for rows, block in rotated_gradient_blocks(a.to(dtype), s.to(dtype), q_a, q_s):  # (batch, rows, d_in)
                torch.sum(block.square_(), dim=0, out=squares[rows])
            _accumulate(sums, name + C.EIGENVALUE_SUM, squares.double().cpu())
        count += len(batch.input_ids)
    return {**{k: v.numpy() for k, v in sums.items()}, "count": count.numpy()}


def _storage_dtype(args: FactorArgs) -> torch.dtype:
    return torch.float64 if args.dtype == "float64" else torch.float32


def aggregate_factors(plan: FitPlan) -> None:
    """Form each strategy's Lambda and damping, write factors.safetensors and the manifest, remove the intermediates."""
    args, strategy, tensors = plan.args, plan.args.strategy, {}
    dtype = _storage_dtype(args)
    basis = load_tensors(plan.out_dir / C.EIGENVECTORS_NAME) if needs_basis(strategy) else {}
    corrected = plan.sums(C.EIGENVALUE_SUMS_NAME).total() if needs_corrected_eigenvalues(strategy) else {}
    for name, shape in plan.info.modules:
        if strategy == "identity":
            eigenvalues = torch.zeros(shape, dtype=torch.float64)
        elif strategy == "kfac":
            _, num_labelled, num_sequences = basis[C.COUNTS].tolist()
            outer = torch.outer(basis[name + C.GRADIENT_EIGENVALUES], basis[name + C.ACTIVATION_EIGENVALUES])
            eigenvalues = outer * (num_labelled / num_sequences)
        else:
            eigenvalues = corrected[name + C.EIGENVALUE_SUM] / corrected["count"]
        if strategy == "identity":
            damping = 1.0
        else:
            damping = args.damping if args.damping is not None else args.damping_scale * float(eigenvalues.mean())
            if not damping > 0:
                raise InfluenceError(f"module {name} has all-zero curvature, so the heuristic damping is 0; pass a fixed --damping")
        tensors[name + C.EIGENVALUES] = eigenvalues.to(dtype)
        tensors[name + C.DAMPING] = torch.tensor(damping, dtype=torch.float64)
        if needs_basis(strategy):
            for key in (C.ACTIVATION_EIGENVECTORS, C.GRADIENT_EIGENVECTORS, C.ACTIVATION_EIGENVALUES, C.GRADIENT_EIGENVALUES):
                tensors[name + key] = basis[name + key].to(dtype)
    if needs_basis(strategy):
        tensors[C.COUNTS] = basis[C.COUNTS]
    save_tensors(plan.out_dir / C.FACTORS_NAME, tensors)
    counts = basis.get(C.COUNTS)
    write_manifest(plan.out_dir, "factors", **{k: v for k, v in plan.identity.items()},
                   factors_fingerprint=file_fingerprint(plan.out_dir / C.FACTORS_NAME),
                   **references(plan.out_dir, model_dir=plan.model_dir, corpus_dir=plan.corpus_dir),
                   num_sequences=plan.sequences.num_rows, num_tokens=int(counts[0]) if counts is not None else None)
    if not args.keep_shards:
        _remove_intermediates(plan)


def _remove_intermediates(plan: FitPlan) -> None:
    for path in [*plan.out_dir.glob(C.OLD_SHARD_PATTERN), *(plan.out_dir / name for name in
                 (C.COVARIANCE_SUMS_NAME, C.EIGENVALUE_SUMS_NAME, C.EIGENVECTORS_NAME))]:
        path.unlink(missing_ok=True)


def load_factors(factors_dir: Path | str, model_fingerprint: Optional[str] = None) -> Factors:
    """Load fitted factors; with `model_fingerprint` (from `models.model_identity`), refuse factors of another model."""
    factors_dir = Path(factors_dir)
    manifest = read_manifest(factors_dir, "factors")
    if model_fingerprint is not None:
        require_same("model", model_fingerprint, manifest["model_fingerprint"], factors_dir,
                     "fit factors for this model with `influence fit`, or pass the model they were fitted on")
    if not (factors_dir / C.FACTORS_NAME).is_file():
        raise InfluenceError(f"{factors_dir} has a manifest but no {C.FACTORS_NAME}; re-run `influence fit` into a new directory")
    _warn_old_label_draws(factors_dir, manifest)
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
            raise InfluenceError(f"{factors_dir / C.FACTORS_NAME} lacks {exc.args[0]}; the manifest was edited or the file is from "
                                 "another fit; re-run `influence fit`") from exc
    return Factors(modules, manifest)


_WARNED_OLD_LABEL_DRAWS: set[str] = set()


def _warn_old_label_draws(factors_dir: Path, manifest: dict) -> None:
    """Say once per process that true-Fisher factors predate LABEL_DRAWS 2 (their Lambda is in-sample): usable, but
    their scores are inflated, by 2.4x on SmolLM2 against Kronfluence."""
    key = str(Path(factors_dir).resolve())
    old = manifest["args"].get("fisher") == "true" and manifest["args"].get("strategy") == "ekfac" and manifest.get("label_draws", 1) != LABEL_DRAWS
    if old and key not in _WARNED_OLD_LABEL_DRAWS:
        _WARNED_OLD_LABEL_DRAWS.add(key)
        LOG.warning("%s was fitted without a record of how its eigenvalue pass drew its labels: an older version's "
                    "eigenvalue pass reused the covariance pass's sampled labels (an in-sample Lambda that inflates "
                    "scores); refit it into a new directory", factors_dir)


def _accumulate(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    if key in sums:
        sums[key].add_(value)
    else:
        sums[key] = value.clone()
