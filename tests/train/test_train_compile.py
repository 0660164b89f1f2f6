"""``apply_compile`` (the trainer's ``--compile``): compiled layers compute the same loss, gradients and expert
loads as the plain model, and the balance tracker's hook runs eagerly (no recompile per layer)."""

import copy

import torch

from glm5 import GLM5ForCausalLM, preset
from glm5.train.balance import ExpertLoadTracker
from glm5.train.distributed import apply_compile


def test_compiled_layers_match_the_plain_model():
    torch._dynamo.reset()
    plain = GLM5ForCausalLM(preset("glm5-nano")).init_weights(0).train()
    compiled = copy.deepcopy(plain)
    apply_compile(compiled)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, plain.config.vocab_size, (2, 24), generator=g)
    results = []
    for model in (plain, compiled):
        tracker = ExpertLoadTracker(model)
        loss = torch.nn.functional.cross_entropy(model(x, dsa="dense").logits[:, :-1].flatten(0, 1),
                                                 x[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        tracker.take_loads()))
    (l0, g0, loads0), (l1, g1, loads1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=n)
    assert loads0.keys() == loads1.keys() and all(torch.equal(loads0[k], loads1[k]) for k in loads0)
