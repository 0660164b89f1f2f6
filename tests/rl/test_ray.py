"""Optional Ray placement: the rollout worker as a Ray actor, weights over a torch.distributed (gloo) group.

Slow (Ray starts ~10 processes and ~1 GB), and skipped when Ray is not installed (it is an optional extra)."""

import os

import pytest

from glm5.rl.ray_launcher import _RolloutActorImpl, ray_available


def test_actor_body_without_ray(model_dir):
    """The actor's body (the worker loop in a thread with in-actor queues) works without Ray."""
    from glm5.rl.rollout import RolloutConfig
    from glm5.rl.rollout_worker import WorkerSpec
    from glm5.rl.sample import Sample

    spec = WorkerSpec(str(model_dir), RolloutConfig(max_new_tokens=8).to_dict(), {"max_num_seqs": 4,
                                                                                  "max_model_len": 128})
    actor = _RolloutActorImpl(spec)
    evs = actor.get_events(timeout=120)
    assert evs and evs[0][0] == "ready"
    from glm5.tokenizer import GLM5Tokenizer

    tok = GLM5Tokenizer.from_pretrained(model_dir)
    task = {"question": "Calculate 1 + 2.", "answer": "3", "answerable": True}
    prompt = tok.apply_chat_template([{"role": "user", "content": task["question"]}], tokenize=True)
    actor.put(("submit", [Sample(prompt_ids=prompt, task=task, max_new_tokens=8)]))
    got = []
    while not got:
        got = [e for e in actor.get_events(timeout=60) if e[0] == "finished"]
    assert got[0][1][0].response_length > 0
    # offload_rollout's messages: the actor's engine gives its memory up, takes it back and generates again
    for msg, reply in ((("sleep", 1), "slept"), (("wake_up", None), "woken")):
        actor.put(msg)
        evs = []
        while not evs:
            evs = [e for e in actor.get_events(timeout=60) if e[0] == reply]
        assert evs[0][1] == msg[1]
    actor.put(("submit", [Sample(prompt_ids=prompt, task=task, max_new_tokens=8)]))
    got = []
    while not got:
        got = [e for e in actor.get_events(timeout=60) if e[0] == "finished"]
    assert got[0][1][0].response_length > 0
    actor.put(("stop",))
    actor.thread.join(30)
    assert not actor.alive()


@pytest.mark.slow
@pytest.mark.skipif(not ray_available(), reason="ray not installed (optional extra)")
@pytest.mark.parametrize("workers,mode", [(1, ["--mode", "async"]), (2, ["--mode", "async"]),
                                          (1, ["--mode", "sync", "--offload-rollout"])],
                         ids=["async-1", "async-2", "sync-offload"])
def test_ray_placement_end_to_end(model_dir, tmp_path, workers, mode):
    import json

    from glm5.cli import main

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file under ~/.ray for a throwaway local cluster
    out = tmp_path / "ray_run"
    try:
        rc = main(["rl", "--model", str(model_dir), "--out", str(out), "--task", "arith", "--n-train", "16",
                   "--steps", "2", "--groups", "2", "--group-size", "2", "--max-new-tokens", "8",
                   "--max-model-len", "128", *mode, "--placement", "ray", "--no-eval", "--no-save",
                   "--no-progress", "--train-threads", "1", "--rollout-threads", "1",
                   "--rollout-workers", str(workers)])
    finally:
        import ray

        ray.shutdown()
    assert rc == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_version"] for r in recs] == [1, 2]
    if "--offload-rollout" in mode:
        assert recs[-1]["rollout_offload_s"] > 0 and all(r["logprob_gap_mean"] < 1e-3 for r in recs)
    if workers > 1:  # one actor per engine, each with its own weight group
        stats = json.loads((out / "summary.json").read_text())["rollout_stats"]
        assert stats["num_workers"] == 2 and all(w["requests"] > 0 for w in stats["workers"])
