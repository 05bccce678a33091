"""Every test runs offline: nothing may reach a model hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _own_lorakit_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty lorakit cache folder (the encoding cache; runs it starts inherit
    it), so a test never reads another's entries nor writes into the user's ~/.cache."""
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path_factory.mktemp("lorakit-cache")))
