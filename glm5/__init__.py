"""glm5: GLM-5 (744B MoE, MLA + DeepSeek Sparse Attention + MTP) implemented from scratch."""

import os

# OpenMP threads that spin while idle starve each other when several processes share a few cores (RL
# rollout + trainer, torchrun workers, servers): let idle threads sleep. Only effective if set before
# torch is imported; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from glm5.config import GLM5Config, preset
from glm5.model.transformer import GLM5ForCausalLM

__all__ = ["GLM5Config", "GLM5ForCausalLM", "preset"]
__version__ = "0.1.0"
