"""File names and keys shared by every stage: one place, so artifacts stay readable across versions."""

MANIFEST_NAME = "manifest.json"
ARGS_NAME = "args.json"

# corpus stage
SEQUENCES_NAME = "sequences.parquet"
SEQUENCE_COLUMNS = ("seq_id", "doc_id", "chunk", "source", "lang", "input_ids", "num_tokens", "text")

# fit stage
COVARIANCE_SHARD_NAME = "covariance_shard_{shard:05d}_of_{num_shards:05d}.safetensors"
EIGENVALUE_SHARD_NAME = "eigenvalue_shard_{shard:05d}_of_{num_shards:05d}.safetensors"
FACTORS_NAME = "factors.safetensors"

# safetensors keys, per module: f"{module}{SUFFIX}"
ACTIVATION_SUM = ".activation_sum"          # sum_t a_t a_t^T          (d_in, d_in)
GRADIENT_SUM = ".gradient_sum"              # sum_t s_t s_t^T          (d_out, d_out)
EIGENVALUE_SUM = ".eigenvalue_sum"          # sum_n (Q_S^T G_n Q_A)^2  (d_out, d_in)
ACTIVATION_EIGENVECTORS = ".activation_eigenvectors"  # Q_A
GRADIENT_EIGENVECTORS = ".gradient_eigenvectors"      # Q_S
EIGENVALUES = ".eigenvalues"                # Lambda (strategy-specific)
DAMPING = ".damping"                        # scalar

# counters stored once per file
NUM_TOKENS = "num_tokens"                   # tokens seen by the activation covariance
NUM_LOSS_TOKENS = "num_loss_tokens"         # tokens with a (sampled or real) label
NUM_SEQUENCES = "num_sequences"

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")

# score stage
SCORES_NAME = "scores.parquet"
