"""Shared fixtures for the engine tests: small random GLM-5 models and no-cache reference decoding."""

import pytest
import torch

from glm5 import GLM5ForCausalLM, preset
from glm5.model.cache import LatentCache, build_attention_mask

TOPK = 8  # small index_topk so that short test prompts already exercise DSA's sparse selection


@pytest.fixture(autouse=True)
def _one_thread():
    # The engine tests run many tiny ops; one intra-op thread is faster and steadier on a shared 2-core box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed: int = 3, **overrides) -> GLM5ForCausalLM:
    cfg = preset("glm5-nano", index_topk=TOPK, **overrides)
    return GLM5ForCausalLM(cfg).init_weights(seed).eval()


def pack_every_head(monkeypatch, decisions) -> None:
    """The engine's LM head packed for oneDNN (glm5/engine/cpu_layout.py) whatever its size and this machine's
    timings say; the decision is recorded in ``decisions``, a test's own file (never the user's)."""
    from glm5.engine import cpu_layout

    if not cpu_layout._onednn_packing():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setattr(cpu_layout, "_packed_wins", lambda shape, repeats: True)
    monkeypatch.setattr(cpu_layout, "PACK_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_layout, "_CHOICE", {})
    monkeypatch.setenv("GLM5_CPU_LAYOUT_CACHE", str(decisions))


@pytest.fixture(scope="session")
def nano():
    """glm5-nano with index_topk 8, its MTP layer sharpened (``sharpen_mtp``) so that draft checks see its cache."""
    return sharpen_mtp(make_model())


@torch.no_grad()
def ref_greedy(model, prompt: list[int], n: int, dsa: str = "sparse") -> list[int]:
    """Greedy continuation by re-running the full model on the whole sequence every step (no cache)."""
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(model(torch.tensor([toks]), dsa=dsa).logits[0, -1].argmax()))
    return toks[len(prompt):]


def _close_call(logits: torch.Tensor, stop_gap: float) -> bool:
    """The draft's two best logits are closer than ``stop_gap`` (the engine then drafts no further)."""
    top = logits.topk(2).values
    return float(top[0] - top[1]) < stop_gap


@torch.no_grad()
def ref_mtp_drafts(model, tokens: list[int], k: int, stop_gap: float = 0.0) -> list[int]:
    """Greedy MTP drafts after ``tokens`` by the model's own recursion (mtp_forward over the whole sequence),
    ending after a close call when ``stop_gap`` > 0."""
    L = len(tokens)
    h = model(torch.tensor([tokens])).hidden_states[:, : L - 1]
    ext, out = list(tokens), []
    pos = torch.arange(L - 1)[None]
    mask = build_attention_mask(1, L - 1, 0, h.device)
    for d in range(1, k + 1):
        logits, h = model.mtp_forward(h, torch.tensor([ext[d:L - 1 + d]]), pos, mask)
        out.append(int(logits[0, -1].argmax()))
        ext.append(out[-1])
        if _close_call(logits[0, -1], stop_gap):
            break
    return out


@torch.no_grad()
def ref_chain_drafts(model, tokens: list[int], k: int, stop_gap: float = 0.0) -> list[int]:
    """Greedy chained MTP drafts (mtp_draft_mode="chain"): depth 1 over the whole sequence gives draft 1; each
    further draft appends (the last MTP output, the last draft) as the next position of that same sequence. Ends
    after a close call when ``stop_gap`` > 0."""
    L = len(tokens)
    hid = model(torch.tensor([tokens])).hidden_states[:, : L - 1]  # h^0 at positions 0..L-2
    toks, out = list(tokens[1:]), []
    for _ in range(k):
        n = hid.shape[1]
        logits, h = model.mtp_forward(hid, torch.tensor([toks]), torch.arange(n)[None],
                                      build_attention_mask(1, n, 0, hid.device))
        out.append(int(logits[0, -1].argmax()))
        hid, toks = torch.cat([hid, h[:, -1:]], dim=1), toks + [out[-1]]
        if _close_call(logits[0, -1], stop_gap):
            break
    return out


def prompts(lengths, seed: int = 0, vocab: int = 2048) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "GLM-5 uses multi-head latent attention and a lightning indexer for sparse attention.",
    "Continuous batching lets requests join and leave the running batch at step boundaries.",
    "Speculative decoding drafts tokens with the MTP layer and verifies them in one forward pass.",
    "Hello world! How are you today? I am fine, thank you very much.",
] * 4


@pytest.fixture(scope="session")
def text_model():
    """A nano model whose vocabulary is exactly the test tokenizer's, so every generated id decodes to text."""
    from glm5.tokenizer import train_bpe

    tok = train_bpe(CORPUS, vocab_size=400, min_frequency=1)
    return make_model(seed=4, vocab_size=tok.vocab_size), tok


@pytest.fixture(scope="session")
def nano_dir(tmp_path_factory, text_model):
    """A saved checkpoint directory (config, safetensors, tokenizer.json)."""
    model, tok = text_model
    d = tmp_path_factory.mktemp("nano_ckpt")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def decode_after_prefill(model, lens: list[int], seed: int, drafts: list[list[int]] | None = None):
    """Prefill every prompt but its last token into a paged cache (block size 4, 20 blocks per prompt), then one
    eager step over each prompt's last token (plus its ``drafts``, as a verification): (runner, step chunks, final
    hidden states [N,H] of the step)."""
    from glm5.engine.kv_cache import PagedKVCache
    from glm5.engine.model_runner import Chunk, ModelRunner

    cfg = model.config
    runner = ModelRunner(model, PagedKVCache(cfg, 64, 4, cfg.num_hidden_layers, model.dtype, "cpu"), 4)
    tables = [list(range(1 + 20 * i, 21 + 20 * i)) for i in range(len(lens))]
    toks = prompts(lens, seed=seed)
    for t, p in zip(tables, toks):
        runner.forward(*runner.build([Chunk(t, 0, p[:-1])]))
    drafts = drafts or [[] for _ in lens]
    chunks = [Chunk(t, len(p) - 1, p[-1:] + d) for t, p, d in zip(tables, toks, drafts)]
    return runner, chunks, runner.forward(*runner.build(chunks))


def count_forward_rows(llm) -> list[int]:
    """Wrap the engine's model forward: the returned list gets each forward's token count (rows computed)."""
    rows, orig = [], llm.engine.runner.forward

    def forward(ids, pos, batch):
        rows.append(ids.numel())
        return orig(ids, pos, batch)

    llm.engine.runner.forward = forward
    return rows


def watch_drafts(engine, model, ref=ref_chain_drafts, most: int | None = None) -> list[bool]:
    """Wrap the engine's MTP proposer: for each greedy sequence given drafts (up to ``most`` of them), the returned
    list gets whether they equal ``ref``'s drafts over its whole sequence, i.e. whether the MTP cache entries it
    read (from the prefix cache, a catch-up after a pause, a recompute) are those it would have computed itself."""
    results: list[bool] = []
    orig = engine.proposer.propose

    def propose(hidden, items, kmax, defer=False):
        ran = orig(hidden, items, kmax, defer)
        for (seq, _, _), k in zip(items, kmax):
            if k and seq.draft_token_ids and seq.params.greedy and (most is None or len(results) < most):
                results.append(seq.draft_token_ids == ref(model, seq.token_ids, len(seq.draft_token_ids)))
        return ran

    engine.proposer.propose = propose
    return results


def sharpen_mtp(model, gain: float = 16.0):
    """Scale the MTP layer's attention output so that its drafts depend on the cached history: at random init the
    layer's attention barely moves its output (wiping the whole history changes 8 of 40 drafts; with ``gain`` 16,
    35 of 40), so a draft check would pass over stale or misplaced MTP cache entries. The main model is unchanged."""
    with torch.no_grad():
        model.model.mtp.self_attn.o_proj.weight.mul_(gain)
    return model


@torch.no_grad()
def reference_cache_rows(model, tokens: list[int], depths: int, dsa: str = "sparse") -> list[tuple]:
    """The cache entries a no-cache forward over ``tokens`` computes, per engine cache layer (main layers, then MTP
    depths 1..``depths``): (latent rows [n, r + dr], indexer keys [n, di] or None). Depth d's row at position t
    reads token t + d, so it has len(tokens) - d rows."""
    L = model.config.num_hidden_layers
    main = LatentCache(L)
    h = model(torch.tensor([tokens]), cache=main, dsa=dsa).hidden_states
    rows = [(torch.cat([main.c_kv[i][0], main.k_pe[i][0]], -1), None if main.k_idx[i] is None else main.k_idx[i][0])
            for i in range(L)]
    for d in range(1, depths + 1):
        n = len(tokens) - d
        c = LatentCache(L + 1)  # the MTP layer writes as layer L
        _, h = model.mtp_forward(h[:, :n], torch.tensor([tokens[d:d + n]]), torch.arange(n)[None],
                                 build_attention_mask(1, n, 0, h.device), cache=c, dsa=dsa)
        rows.append((torch.cat([c.c_kv[L][0], c.k_pe[L][0]], -1), c.k_idx[L][0]))
    return rows


class PrefixCacheAudit:
    """Checks what the prefix cache holds, not only its books: every registered block's entries, in every cache
    layer (MTP depths included), equal those a no-cache forward over the block's tokens computes. Wraps the block
    manager's hash to learn the tokens behind each hash (the prefix up to the block's end, and the extra tokens the
    MTP depths read)."""

    def __init__(self, engine, model, dsa: str = "sparse", atol: float = 1e-4):
        self.engine, self.model, self.dsa, self.atol = engine, model, dsa, atol
        self.tokens: dict[int, tuple[tuple, tuple]] = {}  # hash -> (prefix through the block, extra tokens)
        self.refs: dict[tuple, list] = {}
        self.checked = 0  # blocks compared
        bm, orig = engine.block_manager, engine.block_manager._hash

        def _hash(parent, tokens):
            h = orig(parent, tokens)
            head = self.tokens[parent][0] if parent is not None else ()
            self.tokens[h] = (head + tokens[:bm.block_size], tokens[bm.block_size:])
            return h

        bm._hash = _hash

    def after_every_step(self) -> "PrefixCacheAudit":
        """Check after each engine step (``generate`` included)."""
        step = self.engine.step

        def checked_step(*a, **kw):
            out = step(*a, **kw)
            self.check()
            return out

        self.engine.step = checked_step
        return self

    def _ref(self, toks: tuple) -> list:
        for have, rows in self.refs.items():  # causal: a longer sequence with the same start has the same entries
            if have[:len(toks)] == toks:
                return rows
        depths = self.engine.kv_cache.num_layers - self.model.config.num_hidden_layers
        self.refs[toks] = reference_cache_rows(self.model, list(toks), depths, self.dsa)
        return self.refs[toks]

    def check(self) -> None:
        bm, kv = self.engine.block_manager, self.engine.kv_cache
        bs = bm.block_size
        for h, block in bm.hash_to_block.items():
            head, extra = self.tokens[h]
            ref = self._ref(head + extra)
            lo, slots = len(head) - bs, torch.arange(block * bs, (block + 1) * bs)
            for layer, (lat, idx) in enumerate(ref):
                store = [(kv.latent[layer], lat)] + ([(kv.index[layer], idx)] if idx is not None else [])
                for got, want in store:
                    torch.testing.assert_close(got.view(-1, got.shape[-1])[slots], want[lo:lo + bs], rtol=1e-4,
                                               atol=self.atol, msg=lambda m: f"block {block} layer {layer}: {m}")
            self.checked += 1
