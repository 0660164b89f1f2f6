"""Shared fixtures for the engine tests: small random GLM-5 models and no-cache reference decoding."""

import pytest
import torch

from glm5 import GLM5ForCausalLM, preset
from glm5.model.cache import build_attention_mask

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


@pytest.fixture(scope="session")
def nano():
    return make_model()


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
