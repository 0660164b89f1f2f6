"""FP8 block-scaled linear layers, swapped into a plain GLM-5 model after it is built (torchtitan style).

The model code knows nothing about FP8: :func:`convert_to_fp8` replaces chosen ``nn.Linear`` modules with
:class:`FP8Linear` and fused routed-expert modules with :class:`FP8Experts`. Their state-dict names are the
checkpoint's (``X.weight`` float8_e4m3fn + ``X.weight_scale_inv`` fp32 [⌈out/128⌉, ⌈in/128⌉]; experts
``gate_up_proj`` / ``down_proj`` fp8 + ``*_scale_inv``), so glm5.checkpoint.hf can copy FP8 tensors straight in.

Compute paths (``module.mode``; :func:`set_fp8_mode` sets it model-wide):

* ``"auto"`` (default): on CUDA sm90+ with K and N multiples of 128, ``torch._scaled_mm`` with dynamic
  per-token 1×128 activation scales and the 128×128 weight scales (the DeepSeek/GLM-5 recipe, fp32
  accumulation, bf16/fp32 out). Anything else — CPU, sm89 or older, odd shapes, a torch build without
  blockwise scaling, a failed one-time self-check — falls back to ``"dequant"``.
* ``"dequant"``: dequantise the weight to the activation dtype on the fly and run a plain matmul
  (weight-only FP8: numerically identical to loading with ``fp8="dequantize"``).
* ``"emulate"``: ``"dequant"`` plus the dynamic activation quantisation, i.e. the exact numerics of the
  w8a8 GPU path on any device (used to measure its accuracy on CPU).
* ``"scaled_mm"``: force the GPU kernel; raise instead of falling back.

``kv_b_proj`` stays a dense Linear (dequantised at load): MLA decode absorbs its weight into the query
and output projections. Routed experts have no block-scaled grouped GEMM here: FP8Experts dequantises only the experts that
received tokens in this forward (8 of 256 at decode) and runs the same grouped GEMM as the bf16 model.

FP8 tensors keep their dtype under ``model.to(dtype)`` / ``.half()``: only devices change.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from glm5.checkpoint.fp8 import (BLOCK, FP8_DTYPE, ceil_div, dequantize_block, fake_quant_act, is_fp8_quantizable,
                                 quantize_act, quantize_block, scale_shape)

log = logging.getLogger(__name__)

MODES = ("auto", "dequant", "emulate", "scaled_mm")
_FP8_PARAMS = ("weight", "weight_scale_inv", "gate_up_proj", "gate_up_proj_scale_inv", "down_proj",
               "down_proj_scale_inv")
_selfcheck: dict = {}  # device -> bool (scaled_mm blockwise path verified on this device)
_failed_shapes: set = set()  # (device, K, N) where scaled_mm raised: use the fallback from then on


class _KeepFP8Dtype:
    """Mixin: ``Module._apply`` (``.to``, ``.half``, ``.cuda``, ``to_empty``) moves FP8 weights and their
    fp32 scales between devices but never changes their dtype."""

    def _apply(self, fn, recurse=True):
        order = list(self._parameters)
        held = {n: self._parameters.pop(n) for n in order if n in _FP8_PARAMS and self._parameters[n] is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            moved_params = {}
            for n, p in held.items():
                probe = fn(torch.empty(0, dtype=p.dtype, device=p.device))  # where fn sends it, without a copy
                moved = fn(p.data) if probe.dtype == p.dtype else p.data.to(device=probe.device)
                moved_params[n] = nn.Parameter(moved, requires_grad=False)
            rest = dict(self._parameters)
            self._parameters.clear()
            for n in order:
                self._parameters[n] = moved_params[n] if n in moved_params else rest.pop(n)
            self._parameters.update(rest)
        return self


def _fp8_param(shape, device=None, dtype=FP8_DTYPE) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


# ------------------------------------------------------------------------------------- GPU kernel path
def _scaled_mm_eligible(x: torch.Tensor, K: int, N: int) -> bool:
    if x.device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    if K % BLOCK or N % BLOCK:
        return False
    if (x.device, K, N) in _failed_shapes:
        return False
    # cuBLAS's 1x128 / 128x128 blockwise scaling ("DeepSeek scaling") exists on sm90 only; sm89 has FP8
    # tensor cores but only tensor/row-wise scaling, which cannot express the checkpoint's block scales.
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    return _selfcheck_ok(x.device)


def _scaled_mm_block(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x2 [M,K] (any float dtype) @ dequant(w [N,K] fp8, w_scale [N/128,K/128])ᵀ via torch._scaled_mm."""
    M = x2.shape[0]
    pad = (-M) % 16  # keep the row count friendly to cuBLAS' fp8 kernels (decode has M = 1)
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    xq, xs = quantize_act(x2)  # xs [M, K/128] fp32
    xs = xs.t().contiguous().t()  # 1x128 scales must be outer-dim (M) major
    kernel_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float32) else torch.bfloat16
    out = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=w_scale.t(), out_dtype=kernel_dtype)
    out = out[:M] if pad else out
    return out.to(out_dtype)


def _selfcheck_ok(device: torch.device) -> bool:
    """Run the blockwise kernel once per device on a small problem and compare with the fp32 definition;
    a torch/cuBLAS build that rejects the layout or gets it wrong disables the kernel path."""
    key = str(device)
    if key not in _selfcheck:
        ok = False
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(32, 512, generator=g).to(device=device, dtype=torch.bfloat16)
            wq, ws = quantize_block(torch.randn(256, 512, generator=g) * 0.05)
            wq, ws = wq.to(device), ws.to(device)
            got = _scaled_mm_block(x, wq, ws, torch.bfloat16).float()
            ref = F.linear(fake_quant_act(x.float()), dequantize_block(wq, ws))
            rel = ((got - ref).norm() / ref.norm()).item()
            ok = rel < 1e-2
            if not ok:
                warnings.warn(f"torch._scaled_mm blockwise self-check failed on {device} (rel err {rel:.3g}); "
                              "FP8Linear falls back to dequantise-and-matmul")
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
            log.info("torch._scaled_mm blockwise FP8 unavailable on %s: %s", device, e)
        _selfcheck[key] = ok
    return _selfcheck[key]


def scaled_mm_available(device: str | torch.device = "cuda") -> bool:
    """Whether FP8Linear's "auto" mode will use the block-scaled FP8 GEMM on ``device``."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return _selfcheck_ok(device)


# ------------------------------------------------------------------------------------- modules
class FP8Linear(_KeepFP8Dtype, nn.Module):
    """``y = x Wᵀ (+ b)`` with W stored as float8_e4m3fn + 128×128 block scales (``weight_scale_inv``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 bias_dtype: torch.dtype = torch.float32, block: int = BLOCK):
        super().__init__()
        if block != BLOCK:
            raise ValueError(f"only {BLOCK}x{BLOCK} weight blocks are supported (GLM-5-FP8 format)")
        self.in_features, self.out_features = in_features, out_features
        self.weight = _fp8_param((out_features, in_features), device)
        self.weight_scale_inv = _fp8_param(scale_shape((out_features, in_features)), device, torch.float32)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device)) if bias else None
        self.mode = "auto"

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """Quantise an existing Linear (its weight is read, not kept)."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device,
                bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        if w.device.type != "meta":
            q, s = quantize_block(w.detach())
            m.weight.data.copy_(q)
            m.weight_scale_inv.data.copy_(s)
            if linear.bias is not None:
                m.bias.data.copy_(linear.bias.detach())
        return m

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_block(self.weight, self.weight_scale_inv, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.mode
        if mode in ("auto", "scaled_mm"):
            if mode == "scaled_mm" or _scaled_mm_eligible(x, self.in_features, self.out_features):
                try:
                    y = _scaled_mm_block(x.reshape(-1, self.in_features), self.weight, self.weight_scale_inv, x.dtype)
                    y = y.view(*x.shape[:-1], self.out_features)
                    return y + self.bias.to(y.dtype) if self.bias is not None else y
                except (RuntimeError, ValueError, NotImplementedError) as e:
                    if mode == "scaled_mm":
                        raise
                    _failed_shapes.add((x.device, self.in_features, self.out_features))
                    warnings.warn(f"torch._scaled_mm failed for K={self.in_features} N={self.out_features} ({e}); "
                                  "using dequantise-and-matmul for this shape")
        if mode == "emulate":
            x = fake_quant_act(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8=e4m3 block={BLOCK}x{BLOCK}, mode={self.mode}")


class FP8Experts(_KeepFP8Dtype, nn.Module):
    """Fused routed experts (same interface as glm5.model.moe.Experts) with FP8 weights.

    ``gate_up_proj`` [E, 2I, H] fp8 holds each expert's gate rows then up rows, as the bf16 module; the
    checkpoint quantises gate and up separately, so ``gate_up_proj_scale_inv`` is
    [E, 2·⌈I/128⌉, ⌈H/128⌉] (gate block-rows first). ``down_proj`` [E, H, I] with [E, ⌈H/128⌉, ⌈I/128⌉].
    """

    def __init__(self, n_experts: int, hidden: int, intermediate: int, device=None):
        super().__init__()
        self.n_experts, self.hidden, self.intermediate = n_experts, hidden, intermediate
        rb_i = ceil_div(intermediate, BLOCK)
        self.gate_up_proj = _fp8_param((n_experts, 2 * intermediate, hidden), device)
        self.gate_up_proj_scale_inv = _fp8_param((n_experts, 2 * rb_i, ceil_div(hidden, BLOCK)), device, torch.float32)
        self.down_proj = _fp8_param((n_experts, hidden, intermediate), device)
        self.down_proj_scale_inv = _fp8_param(scale_shape((n_experts, hidden, intermediate)), device, torch.float32)
        self.mode = "auto"
        self.expert_offset: int | None = None  # expert parallelism, as glm5.model.moe.Experts

    @classmethod
    def from_experts(cls, experts: nn.Module) -> "FP8Experts":
        w = experts.gate_up_proj
        m = cls(experts.n_experts, experts.hidden, experts.intermediate, device=w.device)
        if w.device.type != "meta":
            I = experts.intermediate
            rb = ceil_div(I, BLOCK)
            for half, rows in ((0, slice(0, I)), (1, slice(I, 2 * I))):
                q, s = quantize_block(w.detach()[:, rows])
                m.gate_up_proj.data[:, rows] = q
                m.gate_up_proj_scale_inv.data[:, half * rb:(half + 1) * rb] = s
            q, s = quantize_block(experts.down_proj.detach())
            m.down_proj.data.copy_(q)
            m.down_proj_scale_inv.data.copy_(s)
        return m

    def dequantized(self, idx: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        """(gate_up [A,2I,H], down [A,H,I]) in ``dtype`` for experts ``idx`` (all if None)."""
        I = self.intermediate
        rb = ceil_div(I, BLOCK)
        gu, gus, dn, dns = self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj, self.down_proj_scale_inv
        if idx is not None:
            gu, gus, dn, dns = gu[idx], gus[idx], dn[idx], dns[idx]
        gate = dequantize_block(gu[:, :I], gus[:, :rb], dtype=dtype)
        up = dequantize_block(gu[:, I:], gus[:, rb:], dtype=dtype)
        return torch.cat([gate, up], dim=1), dequantize_block(dn, dns, dtype=dtype)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, impl: str = "grouped",
                counts: torch.Tensor | None = None) -> torch.Tensor:
        """x [N,H], ids/weights [N,k] -> [N,H]; only experts that received tokens are dequantised (which needs
        the active set on the host, so this path is not CUDA-graph capturable)."""
        if self.expert_offset is not None:
            from glm5.model.moe import expert_parallel_share

            return expert_parallel_share(x, ids, weights, self.expert_offset, self.n_experts,
                                         lambda xs, i, w: self._forward_all(xs, i, w, impl, None))
        return self._forward_all(x, ids, weights, impl, counts)

    def _forward_all(self, x, ids, weights, impl, counts) -> torch.Tensor:
        from glm5.model.moe import expert_counts, grouped_linear

        emulate = self.mode == "emulate"
        N, k = ids.shape
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        if counts is None:
            counts = expert_counts(ids, self.n_experts)
        active = counts.nonzero().squeeze(1)
        c_act = counts[active]
        offs = c_act.cumsum(0).to(torch.int32)
        w_gu, w_dn = self.dequantized(active, x.dtype)
        xs = x[order // k]
        if emulate:
            xs = fake_quant_act(xs)
        if impl == "reference":
            group = torch.repeat_interleave(torch.arange(active.numel(), device=x.device), c_act)
            outs = []
            for a in range(active.numel()):
                rows = xs[group == a]
                gate, up = F.linear(rows, w_gu[a]).chunk(2, dim=-1)
                h = F.silu(gate) * up
                outs.append(F.linear(fake_quant_act(h) if emulate else h, w_dn[a]))
            ys = torch.cat(outs, 0) if outs else xs.new_zeros(0, self.hidden)
        else:
            gate, up = grouped_linear(xs, w_gu, c_act, offs).chunk(2, dim=-1)
            h = F.silu(gate) * up
            ys = grouped_linear(fake_quant_act(h) if emulate else h, w_dn, c_act, offs)
        ys = ys.float() * weights.reshape(-1)[order, None].float()
        out = torch.empty_like(ys)
        out[order] = ys
        return out.view(N, k, -1).sum(1).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, hidden={self.hidden}, intermediate={self.intermediate}, "
                f"fp8=e4m3 block={BLOCK}x{BLOCK}, mode={self.mode}")


# ------------------------------------------------------------------------------------- model surgery
def _expert_file_keys(module_name: str, n_experts: int) -> list[str]:
    return [f"{module_name}.{e}.{p}.weight" for e in range(n_experts) for p in ("gate_proj", "up_proj", "down_proj")]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# Linears kept dense even when stored FP8: MLA decode absorbs kv_b_proj into the query/output (it reads
# ``kv_b_proj.weight`` directly), so it is dequantised at load, as vLLM does (chat-format-and-serving §5.2).
DENSE_ALWAYS = ("kv_b_proj",)


def convert_to_fp8(model: nn.Module, fp8_keys=None, rule=is_fp8_quantizable, dense=DENSE_ALWAYS) -> list[str]:
    """Swap Linear / routed-expert modules for their FP8 versions, in place; returns the swapped names.

    fp8_keys: checkpoint weight keys stored as FP8 (those with a ``weight_scale_inv``); a Linear is swapped
    iff ``name.weight`` is in it, a fused expert module iff every per-expert weight is. None: decide with
    ``rule(file_key, shape)`` (default: the GLM-5-FP8 keep-unquantised rule).
    On the meta device the new modules are empty shells for a loader to fill; otherwise the current
    weights are quantised (128×128 blocks). Linears whose name ends with an entry of ``dense`` stay
    ``nn.Linear``; with real weights they get the FP8 round trip (quantise, dequantise) so the model's
    numerics equal those of the FP8 checkpoint loaded with ``fp8="keep"``.
    """
    from glm5.model.moe import Experts

    def wanted(key, shape):
        return key in fp8_keys if fp8_keys is not None else rule(key, shape)

    swapped = []
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear:
            if wanted(f"{name}.weight", tuple(mod.weight.shape)):
                if name.endswith(tuple(dense)):
                    if mod.weight.device.type != "meta":
                        with torch.no_grad():
                            w = mod.weight
                            w.copy_(dequantize_block(*quantize_block(w.detach()), dtype=w.dtype))
                    continue
                _set_submodule(model, name, FP8Linear.from_linear(mod))
                swapped.append(name)
        elif isinstance(mod, Experts):
            keys = _expert_file_keys(name, mod.n_experts)
            shapes = [(mod.intermediate, mod.hidden), (mod.intermediate, mod.hidden), (mod.hidden, mod.intermediate)]
            if all(wanted(k, shapes[i % 3]) for i, k in enumerate(keys)):
                _set_submodule(model, name, FP8Experts.from_experts(mod))
                swapped.append(name)
    return swapped


def quantize_model(model: nn.Module, rule=is_fp8_quantizable, dense=DENSE_ALWAYS) -> nn.Module:
    """Quantise a loaded (bf16/fp32) model's Linear and expert weights to FP8 in place (GLM-5-FP8 rule)."""
    with torch.no_grad():
        convert_to_fp8(model, None, rule, dense)
    return model


def set_fp8_mode(model: nn.Module, mode: str) -> nn.Module:
    if mode not in MODES:
        raise ValueError(f"fp8 mode must be one of {MODES}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, (FP8Linear, FP8Experts)):
            m.mode = mode
    return model


def fp8_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))]


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Undo :func:`convert_to_fp8`: put plain Linear / Experts modules (dequantised weights) back, in place."""
    from glm5.model.moe import Experts

    with torch.no_grad():
        for name, mod in list(model.named_modules()):
            if isinstance(mod, FP8Linear):
                dt = dtype or (mod.bias.dtype if mod.bias is not None else torch.float32)
                lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                device=mod.weight.device, dtype=dt)
                lin.weight.copy_(mod.dequantized_weight(dt))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
                _set_submodule(model, name, lin)
            elif isinstance(mod, FP8Experts):
                dt = dtype or torch.float32
                with torch.device("meta"):  # shapes only: the dequantised tensors become the parameters
                    ex = Experts(mod.n_experts, mod.hidden, mod.intermediate)
                gu, dn = mod.dequantized(None, dt)
                ex.gate_up_proj, ex.down_proj = nn.Parameter(gu.contiguous()), nn.Parameter(dn.contiguous())
                ex.expert_offset = mod.expert_offset  # an expert-parallel shard stays one
                _set_submodule(model, name, ex)
    return model
