"""Fixtures of the reliability suite: a finished index over the shared tiny corpus, built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def index_dir(llama_dir, ekfac_dir, corpus_dir, tmp_path_factory):
    from indexes.build import build_index
    from influence.arguments import IndexArgs

    return build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path_factory.mktemp("reliability_index"),
                       IndexArgs(progress=False, sketch_dim=64, keep_shards=True, text_index=True))
