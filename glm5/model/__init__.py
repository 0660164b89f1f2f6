from glm5.model.cache import AttentionContext, LatentCache, build_attention_mask
from glm5.model.transformer import CausalLMOutput, GLM5ForCausalLM, GLM5Model

__all__ = ["AttentionContext", "LatentCache", "build_attention_mask", "CausalLMOutput", "GLM5ForCausalLM", "GLM5Model"]
