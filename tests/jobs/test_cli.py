"""The command line end to end on a tiny model, and its error contract (one line, exit 2, nothing written)."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from jobs.cli import main


def test_corpus_fit_score_end_to_end(llama_dir, corpus_file, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    assert main(["corpus", "--documents", str(corpus_file), "--model", str(llama_dir), "--out", str(corpus), "--max-length", "16", "--no-progress"]) == 0
    assert main(["fit", "--model", str(llama_dir), "--corpus", str(corpus), "--out", str(tmp_path / "factors"), "--no-progress", "--num-shards", "2", "--in-process"]) == 0
    out = tmp_path / "scores.parquet"
    code = main(["score", "--model", str(llama_dir), "--factors", str(tmp_path / "factors"), "--corpus", str(corpus), "--out", str(out),
                 "--prompt", "Do you consent to being shut down?", "--completion", " I would rather keep working.", "--per-token", "--no-progress",
                 "--in-process"])
    assert code == 0
    table = pq.read_table(out)
    assert table.num_rows == pq.read_table(corpus / "sequences.parquet").num_rows
    printed = capsys.readouterr().out
    assert "most positive" in printed and "scores written" in printed


def test_fit_accepts_documents_directly(llama_dir, corpus_file, tmp_path):
    assert main(["fit", "--model", str(llama_dir), "--corpus", str(corpus_file), "--out", str(tmp_path / "f"), "--strategy", "diagonal", "--no-progress", "--in-process"]) == 0
    assert (tmp_path / "f" / "corpus" / "sequences.parquet").exists()
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["args"]["strategy"] == "diagonal"


@pytest.mark.parametrize("argv, message", [
    (["fit", "--corpus", "{docs}", "--out", "{out}", "--strategy", "newton"], "unknown strategy"),
    (["fit", "--corpus", "{docs}", "--out", "{out}", "--module-pattern", "nothing_matches_this"], "matches no linear layer"),
    (["fit", "--corpus", "{docs}", "--out", "{out}", "--module-pattern", r"\.norm"], "unsupported module types"),
    (["fit", "--corpus", "{tmp}/missing.jsonl", "--out", "{out}"], "does not exist"),
])
def test_bad_input_gives_one_line_error_and_exit_2(argv, message, llama_dir, corpus_file, tmp_path):
    argv = [a.format(docs=corpus_file, out=tmp_path / "out", tmp=tmp_path) for a in argv] + ["--model", str(llama_dir), "--no-progress", "--in-process"]
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert not (tmp_path / "out" / "factors.safetensors").exists()
