"""``glm5 serve --generation-config``: request defaults from the model's generation_config.json (vLLM's flag)."""

import json
import types

import pytest

from glm5.serve.cli import sampling_defaults
from glm5.serve.settings import ServeSettings


def test_defaults_come_from_the_model_another_directory_or_vllm(tmp_path):
    base = ServeSettings()
    model = types.SimpleNamespace(generation_config={"temperature": 0.6, "top_p": 0.9, "eos_token_id": [0]})
    s = sampling_defaults(base, "auto", model)
    assert (s.default_temperature, s.default_top_p) == (0.6, 0.9)
    bare = types.SimpleNamespace(generation_config={"eos_token_id": [0]})  # ours: no sampling fields
    s = sampling_defaults(base, "auto", bare)
    assert (s.default_temperature, s.default_top_p) == (base.default_temperature, base.default_top_p)  # GLM-5's
    s = sampling_defaults(base, "vllm", model)
    assert (s.default_temperature, s.default_top_p) == (1.0, 1.0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0.5}))
    s = sampling_defaults(base, str(tmp_path), model)
    assert (s.default_temperature, s.default_top_p) == (base.default_temperature, 0.5)
    with pytest.raises(ValueError, match="cannot read"):
        sampling_defaults(base, str(tmp_path / "nowhere"), model)
    with pytest.raises(ValueError, match="top_p"):
        sampling_defaults(base, "auto", types.SimpleNamespace(generation_config={"top_p": 2}))


def test_the_served_defaults_reach_requests(model_dir):
    """A model whose generation_config.json says temperature 0 answers greedily when the request sets none."""
    import httpx

    from glm5.serve.cli import build_app

    from .conftest import MODEL_NAME, ServerThread

    gen = json.loads((model_dir / "generation_config.json").read_text())
    try:
        (model_dir / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.0}))
        app = build_app(str(model_dir), ServeSettings(served_model_names=[MODEL_NAME]), max_model_len=512)
    finally:
        (model_dir / "generation_config.json").write_text(json.dumps(gen))
    with ServerThread(app) as srv:
        body = {"model": MODEL_NAME, "prompt": "The king", "max_tokens": 8, "ignore_eos": True}
        texts = {httpx.post(srv.url + "/v1/completions", json={**body, "seed": s}, timeout=60).json()["choices"][0]
                 ["text"] for s in range(3)}
        assert len(texts) == 1  # greedy whatever the seed
