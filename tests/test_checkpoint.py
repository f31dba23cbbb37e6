"""io/checkpoint.py: which weight files a checkpoint directory holds."""

from __future__ import annotations

import json

from router_tune.io.checkpoint import weight_files


def test_weight_files_index_aware(copy_of, mixtral_legacy):
    d = copy_of(mixtral_legacy)
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"}})
    )
    assert weight_files(d) == [d / "model-00001-of-00001.safetensors"]
