"""One small dataclass per stage. Every field has a default and a help string; `to_dict()` is saved
beside the stage's output, and a re-run whose arguments differ from the saved ones is refused."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch

from influence.constants import STRATEGIES
from influence.errors import InfluenceError
from influence.models import DTYPES, check_device

SKETCHES = ("hashed",)
# candidates per sign a query takes from the index by default: each costs an exact re-rank unless a refine tier orders
# them; there reads stop once no candidate left can enter the top k, so deeper pools cost little (measured recall@10 of
# the exact top-10 on benchmarks/query_latency.py: 0.97 -> 0.99 on the negative side from 400 to 1000)
DEFAULT_CANDIDATES = 200
GENERATORS = ("index", "bm25", "hybrid", "exact")
REFINE_CANDIDATES = 1000


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


class StageArgs:
    """Shared behaviour: dict round-trip, and refusing to resume with different settings."""

    #: fields that do not change an artifact (speed knobs) and so may differ between runs
    RUNTIME_ONLY: tuple[str, ...] = ()
    #: fields used only by a stage's final reduce (not by its shards): an unfinished run resumed with other values (a
    #: corrected FAISS factory after the merge failed) keeps its shards; a finished artifact must still match them
    REDUCE_ONLY: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InfluenceError(f"unknown {cls.__name__} fields {sorted(unknown)}; valid fields are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any):
        return type(self).from_dict({**self.to_dict(), **changes})

    def artifact_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_ONLY}

    def require_matches(self, saved: dict[str, Any], where: str) -> None:
        """Refuse to resume or reuse `where` (an artifact directory) with settings other than its saved ones; a directory
        without a manifest (an unfinished run) may differ in the REDUCE_ONLY fields, which its shards do not depend on."""
        from influence.constants import MANIFEST_NAME

        ignored = self.RUNTIME_ONLY + (() if (Path(where) / MANIFEST_NAME).exists() else self.REDUCE_ONLY)
        mine = {k: v for k, v in self.artifact_dict().items() if k not in ignored}
        # a setting added after the artifact was written is absent from it: it was built as that setting's default
        defaults = type(self)().artifact_dict()
        theirs = {k: v for k, v in {**{k: d for k, d in defaults.items() if k not in saved}, **saved}.items() if k not in ignored}
        diffs = {k: (theirs.get(k), mine.get(k)) for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k)}
        if diffs:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(diffs.items()))
            raise InfluenceError(
                f"{where} was built with different {type(self).__name__} ({detail}); "
                "use the saved settings or write to a new output directory"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]  # type: ignore[attr-defined]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of factors and sketches: float64 when the model runs in float64, else float32."""
        return torch.float64 if self.dtype == "float64" else torch.float32  # type: ignore[attr-defined]


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise InfluenceError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(DTYPES))}")


def check_positive(name: str, value: Optional[float], allow_none: bool = False) -> None:
    """A finite number > 0 (NaN and inf are not: `nan <= 0` is False, so a plain comparison lets them through)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InfluenceError(f"{name} must be a finite number > 0, got {value!r}; pass a number > 0")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InfluenceError(f"{name} must be a positive integer, got {value!r}; pass 1 or more")


MAX_SEED = 2**32 - 1


def check_seed(name: str, value: Any) -> None:
    """Seeds feed torch generators and hash functions: an integer in [0, 2^32) (a negative or huge one would fail later)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InfluenceError(f"{name} must be an integer from 0 to {MAX_SEED}, got {value!r}; pass e.g. 0")


def _check_runtime(args: Any) -> None:
    check_dtype(args.dtype)
    check_device(args.device)
    check_positive_int("batch_tokens", args.batch_tokens)


BATCH_TOKENS_HELP = ("padded tokens per forward/backward pass at most: sequences are sorted by length and cut into "
                     "batches of this size or less where that pads less (a longer sequence goes alone); lowered for a "
                     "large model, so that one batch's captured module inputs and gradients stay within 1 GiB (an eighth of a "
                     "GPU's memory)")


@dataclass
class CorpusArgs(StageArgs):
    """How documents become token sequences.

    Chunking policy: each document is tokenised once (with the tokenizer's special tokens), then cut
    into consecutive, non-overlapping chunks of at most `max_length` tokens ("chunk"), or only its
    first `max_length` tokens are kept ("truncate"). Every chunk keeps its document's id, source and
    language, plus its chunk number; chunks shorter than `min_tokens` are dropped (a sequence needs
    two tokens to have a next-token loss), and the stage says how many.
    """

    max_length: int = _help("tokens per sequence; longer documents are chunked or truncated", 512)
    policy: str = _help("'chunk' (split long documents) or 'truncate' (keep the head)", "chunk")
    min_tokens: int = _help("drop sequences shorter than this (at least 2)", 2)
    add_special_tokens: bool = _help("let the tokenizer add its BOS/EOS tokens", True)

    def __post_init__(self) -> None:
        if self.policy not in ("chunk", "truncate"):
            raise InfluenceError(f"policy must be 'chunk' or 'truncate', got {self.policy!r}; pass --policy chunk or --policy truncate")
        check_positive_int("max_length", self.max_length)
        if self.max_length < 2:
            raise InfluenceError(f"max_length must be at least 2 tokens, got {self.max_length}; pass --max-length 2 or more")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or not 2 <= self.min_tokens <= self.max_length:
            raise InfluenceError(f"min_tokens must lie in [2, max_length={self.max_length}], got {self.min_tokens!r}; "
                                 "pass a --min-tokens from 2 to --max-length")


@dataclass
class FactorArgs(StageArgs):
    """EK-FAC curvature fit (Grosse et al. 2023, section 2.2)."""

    RUNTIME_ONLY = ("batch_tokens", "device", "progress", "keep_shards")

    strategy: str = _help("identity | diagonal | kfac | ekfac", "ekfac")
    fisher: str = _help("'true': labels sampled from the model (the paper); 'empirical': real labels", "true")
    module_pattern: Optional[str] = _help("regex over module names; default: the MLP linear layers", None)
    damping: Optional[float] = _help("fixed damping; default: damping_scale x mean eigenvalue per module", None)
    damping_scale: float = _help("the heuristic damping's multiple of the mean eigenvalue", 0.1)
    dtype: str = _help("dtype of the model while fitting (factors are float32, or float64 with a float64 model)", "float32")
    seed: int = _help("seed for the sampled labels of the true Fisher", 0)
    batch_tokens: int = _help(BATCH_TOKENS_HELP, 2048)
    keep_shards: bool = _help("keep each pass's sums and pass 1's eigenvectors after the fit (they are removed by default)", False)
    device: str = _help("torch device: cpu, cuda, cuda:N", "cpu")
    progress: bool = _help("show progress bars", True)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InfluenceError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.fisher not in ("true", "empirical"):
            raise InfluenceError(f"fisher must be 'true' or 'empirical', got {self.fisher!r}; pass --fisher true or --fisher empirical")
        check_positive("damping", self.damping, allow_none=True)
        check_positive("damping_scale", self.damping_scale)
        check_seed("seed", self.seed)
        _check_runtime(self)


@dataclass
class ScoreArgs(StageArgs):
    """Exact influence scores of a batch of queries against every training sequence."""

    RUNTIME_ONLY = ("batch_tokens", "device", "progress")

    query_rank: Optional[int] = _help("rank-r SVD compression of each preconditioned query gradient (paper, sec. 3.2)", None)
    per_module: bool = _help("also return each module's share of the score", True)
    per_token: bool = _help("also return each training token's contribution (slower)", False)
    self_influence: bool = _help("also compute each sequence's exact self-influence ||W(z)||^2: it rotates every token "
                                 "into the eigenbasis, 1.6-2.2x the scan's time on the real models; an index's doc table "
                                 "holds it already", False)
    dtype: str = _help("dtype of the model during scoring", "float32")
    batch_tokens: int = _help(BATCH_TOKENS_HELP, 2048)
    device: str = _help("torch device: cpu, cuda, cuda:N", "cpu")
    progress: bool = _help("show progress bars", True)

    def __post_init__(self) -> None:
        _check_runtime(self)
        if self.query_rank is not None:
            check_positive_int("query_rank", self.query_rank)


@dataclass
class IndexArgs(StageArgs):
    """Gradient-sketch index over a corpus (DESIGN.md, "The index")."""

    # text_index adds a BM25 index of the text beside the sketches, which it leaves as they are: asked of a finished
    # index, it stores only that
    RUNTIME_ONLY = ("batch_tokens", "device", "progress", "keep_shards", "text_index")
    REDUCE_ONLY = ("factory", "train_size", "fold_dim")

    sketch_dim: int = _help("numbers per document, shared by every tracked module however deep the model is: the "
                            "EK-FAC-whitened gradients of all modules are hashed (count sketch) into one vector of this size, "
                            "stored as 4-bit codes (half a byte each)", 8192)
    sketch: str = _help("sketch method: 'hashed' (count sketch of the whitened gradient, seeded per module)", "hashed")
    seed: int = _help("seed of the hash functions (derived per module)", 0)
    factory: str = _help("the compact first tier: a FAISS index_factory string over the sketches folded to fold_dim numbers "
                         "(e.g. IVF1024,PQ32: 32 bytes per document in memory), 'none' to scan the 4-bit sketch store "
                         "exactly, or 'auto': none below 100,000 sequences, IVF<sqrt n>,PQ<fold_dim/8> above", "auto")
    fold_dim: int = _help("numbers per document the first tier indexes (the sketch folded: still an unbiased sketch)", 256)
    train_size: int = _help("rows sampled to train IVF/PQ indexes", 50_000)
    shard_size: int = _help("sequences per resumable shard", 256)
    keep_shards: bool = _help("keep the per-shard sketch files after the merge (they double the disk use)", False)
    refine: bool = _help("also store every document's whitened gradient itself in float16 (2 bytes per number of the tracked "
                         "modules' gradients, on disk, memory-mapped): a refine tier whose scores are exact up to a bounded "
                         "rounding, so a query re-ranks exactly little more than the documents it returns. For models up to "
                         "a few million tracked gradient numbers", False)
    text_index: bool = _help("also store a BM25 index of the sequences' text (the bm25 and hybrid generators' first stage), "
                             "memory-mapped by every query instead of built in each one's memory; asked of a finished "
                             "index, adds only that (needs the bm25 extra)", False)
    dtype: str = _help("dtype of the model while sketching", "float32")
    batch_tokens: int = _help(BATCH_TOKENS_HELP, 2048)
    device: str = _help("torch device: cpu, cuda, cuda:N", "cpu")
    progress: bool = _help("show progress bars", True)

    def __post_init__(self) -> None:
        if self.sketch not in SKETCHES:
            raise InfluenceError(f"unknown sketch {self.sketch!r}; choose one of {', '.join(SKETCHES)}")
        for name in ("sketch_dim", "train_size", "shard_size", "fold_dim"):
            check_positive_int(name, getattr(self, name))
        check_seed("seed", self.seed)
        if not self.factory or not self.factory.strip():
            raise InfluenceError("factory must be a FAISS factory string or 'none'; pass e.g. --factory none")
        _check_runtime(self)


@dataclass
class QueryArgs(StageArgs):
    """One query against an index: candidates from a generator, then an exact EK-FAC re-rank."""

    RUNTIME_ONLY = ("batch_tokens", "device", "progress")

    top_k: int = _help("documents returned per sign (most positive and most negative)", 10)
    candidates: Optional[int] = _help(f"candidates per sign taken from the index, re-ranked exactly at most (default: "
                                      f"{DEFAULT_CANDIDATES}; {REFINE_CANDIDATES} on an index with a refine tier, whose reads "
                                      "stop early, so a deeper pool costs little)", None)
    generator: str = _help("candidate generator: 'index' (search over sketches), 'bm25' (text), 'hybrid' (the sketches' "
                           "candidates and BM25's top text_candidates together; a refine tier is not read), 'exact' (full scan)",
                           "index")
    text_candidates: int = _help("BM25 candidates the hybrid generator adds to the index's, all re-ranked (text retrieval has "
                                 "no noise bound to stop on); only sequences sharing a word with the query count", 50)
    rerank: bool = _help("score the candidates exactly (EK-FAC) with per-layer and per-token breakdowns; off: return the top "
                         "sketch scores (index generator only), an estimate without breakdowns, in the time of a search", True)
    adaptive: bool = _help("re-rank index candidates best-first and stop a sign once none left can plausibly enter its top k "
                           "(sketch score + stop_margin x sketch noise < the k-th exact score); off: re-rank every candidate", True)
    stop_margin: float = _help("standard deviations of sketch noise allowed for in the adaptive stop; larger is safer and slower", 2.0)
    nprobe: Optional[int] = _help("IVF lists visited per search (indexes whose first tier is IVF)", None)
    first_tier_depth: int = _help("candidates per sign the first tier proposes for the sketch store to order (indexes with a "
                                  "first tier)", 2000)
    per_token: bool = _help("compute per-token influence inside the returned documents", True)
    refine: bool = _help("order the index's candidates by its refine tier (indexes built with --refine) before the exact re-rank", True)
    dtype: str = _help("dtype of the model while querying", "float32")
    batch_tokens: int = _help(BATCH_TOKENS_HELP, 2048)
    device: str = _help("torch device: cpu, cuda, cuda:N", "cpu")
    progress: bool = _help("show a progress bar for the exact re-rank (one that runs past 2 s)", False)

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise InfluenceError(f"unknown candidate generator {self.generator!r}; choose {', '.join(GENERATORS[:-1])} or {GENERATORS[-1]}")
        for name in ("top_k", "first_tier_depth", "text_candidates"):
            check_positive_int(name, getattr(self, name))
        for name in ("candidates", "nprobe"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if not self.rerank and self.generator != "index":
            raise InfluenceError(f"without the re-rank documents are ranked by sketch scores, which the {self.generator!r} generator "
                                 "does not give; use --generator index or keep the re-rank")
        if isinstance(self.stop_margin, bool) or not isinstance(self.stop_margin, (int, float)) or not math.isfinite(self.stop_margin) \
                or self.stop_margin < 0:
            raise InfluenceError(f"stop_margin must be a non-negative number of standard deviations, got {self.stop_margin}; "
                                 "pass 0 or more (default 2; larger re-ranks more candidates)")
        if self.candidates is not None and self.candidates < self.top_k:
            raise InfluenceError(f"candidates ({self.candidates}) must be at least top_k ({self.top_k}); raise --candidates or lower --top-k")
        _check_runtime(self)

    def depth(self, refines: bool) -> int:
        """Candidates per sign taken from the index: `candidates`, else the default for the index's tiers (at least top_k)."""
        if self.candidates is not None:
            return self.candidates
        return max(REFINE_CANDIDATES if refines else DEFAULT_CANDIDATES, self.top_k)
