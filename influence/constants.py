"""File names and keys shared by every stage: one place, so artifacts stay readable across versions."""

MANIFEST_NAME = "manifest.json"
ARGS_NAME = "args.json"
LOCK_NAME = ".lock"

# corpus stage
SEQUENCES_NAME = "sequences.parquet"

# fit stage: the passes' sums and the eigenvectors are intermediate (kept while the fit can resume, removed once it is done)
COVARIANCE_SUMS_NAME = "covariance_sums.safetensors"   # pass 1's running sums while a fit is resumable
EIGENVALUE_SUMS_NAME = "eigenvalue_sums.safetensors"   # pass 2's
SUMMED_SHARDS = "summed_shards"                        # in a sums file: (shards summed, shards of the pass), int64
OLD_SHARD_PATTERN = "*_shard_*_of_*.safetensors"       # an earlier version's one file per pass shard
EIGENVECTORS_NAME = "eigenvectors.safetensors"
FACTORS_NAME = "factors.safetensors"

# safetensors keys, per module: f"{module}{SUFFIX}"
ACTIVATION_SUM = ".activation_sum"          # sum_t a_t a_t^T          (d_in, d_in)
GRADIENT_SUM = ".gradient_sum"              # sum_t s_t s_t^T          (d_out, d_out)
EIGENVALUE_SUM = ".eigenvalue_sum"          # sum_n (Q_S^T G_n Q_A)^2  (d_out, d_in)
ACTIVATION_EIGENVECTORS = ".activation_eigenvectors"  # Q_A
GRADIENT_EIGENVECTORS = ".gradient_eigenvectors"      # Q_S
ACTIVATION_EIGENVALUES = ".activation_eigenvalues"    # l_A
GRADIENT_EIGENVALUES = ".gradient_eigenvalues"        # l_S
EIGENVALUES = ".eigenvalues"                # Lambda (strategy-specific)
DAMPING = ".damping"                        # scalar
COUNTS = "counts"                           # tokens, labelled tokens, sequences (float64)

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")

# The files each kind of artifact may hold (glob patterns): an output directory holding anything else is refused.
ARTIFACT_FILES = {
    "corpus": (MANIFEST_NAME, ARGS_NAME, SEQUENCES_NAME, "corpus"),
    "factors": (MANIFEST_NAME, ARGS_NAME, FACTORS_NAME, EIGENVECTORS_NAME, COVARIANCE_SUMS_NAME, EIGENVALUE_SUMS_NAME,
                "covariance_shard_*", "eigenvalue_shard_*", "corpus"),
    "index": (MANIFEST_NAME, ARGS_NAME, "index.faiss", "docs.parquet", "index.json", "sketches.npy", "refine.npy", "sketch_shard_*",
              "text_index"),
    "query": ("results.json", "results.parquet", "report.html"),
    "compare": ("top_k.*", "overlap.*", "*_vs_size.png", "summary.json"),
    "audit": ("outliers*", "by_source.*", "by_lang.*", "dominant.*", "self_influence.png", "summary.json", "report.html"),
    # `influence models`: one save_pretrained directory per model of jobs.models.REAL_MODELS
    "models": ("smollm2-135m-instruct", "gemma-3-270m"),
}
