"""glm5: GLM-5 (744B MoE, MLA + DeepSeek Sparse Attention + MTP) implemented from scratch."""

from glm5.config import GLM5Config, preset
from glm5.model.transformer import GLM5ForCausalLM

__all__ = ["GLM5Config", "GLM5ForCausalLM", "preset"]
__version__ = "0.1.0"
