"""What the engine takes from a checkpoint directory: dtype names and "auto", and generation_config.json's eos ids."""

import json

import pytest
import torch

from glm5.engine import LLM, SamplingParams

from .conftest import make_model


def test_dtype_names_and_auto(tmp_path):
    make_model().save_pretrained(tmp_path, dtype=torch.bfloat16)  # config.json says bfloat16
    assert LLM(str(tmp_path), dtype="auto").engine.model.dtype == torch.bfloat16
    assert LLM(str(tmp_path)).engine.model.dtype == torch.float32  # the CPU default
    assert LLM(make_model(), dtype="bf16").engine.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        LLM(make_model(), dtype="int8")


def test_generation_config_eos_ids_end_generation(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    extra = 77  # not one of config.json's eos ids
    assert extra not in model.config.eos_token_ids
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [*gen["eos_token_id"], extra]}))
    llm = LLM(str(tmp_path))
    out = llm.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=8, logit_bias={extra: 100.0}),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [extra] and out.finish_reason == "stop"
