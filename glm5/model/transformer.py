"""The GLM-5 decoder stack and causal-LM head.

Module tree and parameter names follow the official checkpoint: ``model.embed_tokens``,
``model.layers.{0..N-1}`` (pre-norm MLA + dense MLP or MoE), ``model.layers.N`` = the MTP block,
``model.norm``, ``lm_head`` (untied). Only routed experts differ from the files: they are held fused
(see glm5.model.moe); glm5.checkpoint maps names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glm5.config import GLM5Config
from glm5.model.cache import AttentionContext, build_attention_mask
from glm5.model.mla import MLAttention
from glm5.model.moe import MLP, MoE
from glm5.model.norm import RMSNorm
from glm5.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GLM5Config, layer_idx: int, moe: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """``shared_head``: only a norm is stored; the projection is the main model's lm_head."""

    def __init__(self, cfg: GLM5Config):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """The multi-token-prediction block (checkpoint layer ``num_hidden_layers``).

    To predict token t+d+1 from position t at depth d: z = eh_proj([enorm(embed(x_{t+d})) ‖ hnorm(h^{d-1}_t)]),
    h^d = DecoderLayer(z), logits = lm_head(shared_head.norm(h^d)). h^0 is the main model's final (normed)
    hidden state, as vLLM/SGLang feed it when serving GLM-5's MTP; deeper steps reuse this one layer
    (GLM-5 trains 3 steps with shared parameters).
    """

    def __init__(self, cfg: GLM5Config, layer_idx: int):
        super().__init__(cfg, layer_idx, moe=cfg.mtp_layer_is_moe)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def step(self, emb: torch.Tensor, h_prev: torch.Tensor, rope, ctx: AttentionContext) -> torch.Tensor:
        z = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))  # embedding first
        return DecoderLayer.forward(self, z, rope, ctx)


class GLM5Model(nn.Module):
    def __init__(self, cfg: GLM5Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        kinds = cfg.mlp_layer_types
        layers: list[nn.Module] = [DecoderLayer(cfg, i, kinds[i] == "sparse") for i in range(cfg.num_hidden_layers)]
        if cfg.num_nextn_predict_layers > 0:
            layers.append(MTPLayer(cfg, cfg.num_hidden_layers))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta)

    @property
    def mtp(self) -> MTPLayer | None:
        return self.layers[self.cfg.num_hidden_layers] if self.cfg.num_nextn_predict_layers > 0 else None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """input_ids [B,S] -> final normed hidden states [B,S,H]."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary(position_ids, x.dtype)
        ctx.topk_indices = None
        for layer in self.layers[: self.cfg.num_hidden_layers]:
            x = layer(x, rope, ctx)
        return self.norm(x)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B,S',V] for the kept positions
    hidden_states: torch.Tensor  # [B,S,H] final normed hidden (input to lm_head and to MTP)
    aux_losses: list  # indexer KL losses per layer when requested
    cache: object | None = None


class GLM5ForCausalLM(nn.Module):
    """``from glm5 import GLM5ForCausalLM``. Checkpoint I/O lives in glm5.checkpoint and is exposed as
    ``from_pretrained`` / ``save_pretrained``."""

    def __init__(self, cfg: GLM5Config):
        super().__init__()
        self.config = cfg
        self.model = GLM5Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # -------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, dsa: str = "sparse",
                indexer_loss: str | None = None, logits_to_keep: int = 0, compute_logits: bool = True) -> CausalLMOutput:
        """input_ids [B,S]; attention_mask: [B,past+S] padding mask (1 = token) or a [B,1,S,T] bool mask;
        cache: a LatentCache (or an engine cache) to read and extend; logits_to_keep: 0 = all positions,
        n = the last n; ``compute_logits=False`` leaves ``logits`` None (the trainer applies the LM head
        fused with its loss, glm5.train.linear_ce)."""
        B, S = input_ids.shape
        past = cache.seq_length(0) if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(S, device=input_ids.device) + past)[None].expand(B, S)
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask.bool()
        else:
            mask = build_attention_mask(B, S, past, input_ids.device, attention_mask)
        ctx = AttentionContext(mask=mask, cache=cache, dsa=dsa, indexer_loss=indexer_loss)
        hidden = self.model(input_ids, position_ids, ctx)
        h = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.lm_head(h) if compute_logits else None
        return CausalLMOutput(logits=logits, hidden_states=hidden, aux_losses=ctx.aux_losses, cache=cache)

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor,
                    mask: torch.Tensor, cache=None, dsa: str = "sparse", indexer_loss: str | None = None,
                    aux_losses: list | None = None, compute_logits: bool = True,
                    detach_embeddings: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP step. hidden [B,S,H] = h^{d-1} at positions t; next_ids [B,S] = tokens x_{t+d}.
        Returns (logits [B,S,V] predicting x_{t+d+1}, h^d [B,S,H]); with ``compute_logits=False`` the first
        is the LM head's input (``shared_head.norm(h^d)``) instead. With ``indexer_loss`` (training), the MTP
        layer's indexer KL is appended to ``aux_losses``. ``detach_embeddings``: no gradient to the shared
        embedding table through this step."""
        mtp = self.model.mtp
        if mtp is None:
            raise ValueError("this model has no MTP layer (num_nextn_predict_layers = 0)")
        ctx = AttentionContext(mask=mask, cache=cache, dsa=dsa, indexer_loss=indexer_loss)
        emb = self.model.embed_tokens(next_ids)
        emb = emb.detach() if detach_embeddings else emb
        rope = self.model.rotary(position_ids, emb.dtype)
        h = mtp.step(emb, hidden, rope, ctx)
        if aux_losses is not None:
            aux_losses.extend(ctx.aux_losses)
        head_in = mtp.shared_head.norm(h)
        return (self.lm_head(head_in) if compute_logits else head_in), h

    # -------------------------------------------------------------------------------- utilities
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, l.mlp) for i, l in enumerate(self.model.layers) if isinstance(l.mlp, MoE)]

    def set_experts_impl(self, impl: str) -> None:
        if impl not in ("grouped", "reference"):
            raise ValueError(f"experts impl must be 'grouped' or 'reference', got {impl!r}")
        for _, m in self.moe_layers():
            m.experts_impl = impl

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "GLM5ForCausalLM":
        """Random init as transformers does: normal(0, initializer_range) for matrices, ones for norms,
        LayerNorm bias zero, router bias zero, padding embedding row zero."""
        g = torch.Generator(device="cpu")
        if seed is not None:
            g.manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g).to(p.dtype))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for _, m in self.moe_layers():
            m.gate.e_score_correction_bias.zero_()
        pad = self.config.pad_token_id
        if pad is not None:
            self.model.embed_tokens.weight[pad].zero_()
        return self

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16, temperature: float = 0.0,
                 eos_token_ids: list[int] | None = None, seed: int | None = None) -> torch.Tensor:
        """Minimal cached generation (greedy or temperature sampling) for smoke tests and the README demo.
        The inference engine (glm5.engine) is the real serving path."""
        from glm5.model.cache import LatentCache

        cache = LatentCache(len(self.model.layers))
        g = torch.Generator(device=input_ids.device)
        if seed is not None:
            g.manual_seed(seed)
        out = input_ids
        step_ids = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        eos = torch.tensor(eos_token_ids or [], device=input_ids.device, dtype=torch.long)
        for _ in range(max_new_tokens):
            logits = self(step_ids, cache=cache, logits_to_keep=1).logits[:, -1].float()
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)[:, 0]
            else:
                nxt = logits.argmax(-1)
            if eos.numel():
                nxt = torch.where(done, eos[0], nxt)
                done |= torch.isin(nxt, eos)
            out = torch.cat([out, nxt[:, None]], dim=1)
            step_ids = nxt[:, None]
            if eos.numel() and bool(done.all()):
                break
        return out

    # Checkpoint I/O, defined in glm5.checkpoint (imported lazily: model must not depend on it at import).
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        **kw) -> "GLM5ForCausalLM":
        from glm5.checkpoint.hf import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, **kw)

    def save_pretrained(self, path, max_shard_size: int | str = "5GB", **kw) -> None:
        from glm5.checkpoint.hf import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, **kw)
