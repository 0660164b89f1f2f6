"""Sleep mode: hand the engine's memory back between generation phases, and take it again (vLLM's
``LLM.sleep(level)`` / ``wake_up(tags)``; SGLang's release / resume_memory_occupation, which slime calls).

Why: in colocated RL (slime's ``--colocate``; ``glm5 rl --placement colocate``) the rollout engine and the trainer
share the accelerators. The engine's KV cache is sized to fill the free memory, and its weights are a second copy
of the policy; both must go while the trainer runs, or the trainer has nothing left for its activations and
optimizer state.

* ``sleep(level=1)``: the KV cache is discarded and the weights are moved to host memory (pinned on CUDA, for a
  fast copy back). ``wake_up()`` restores them bit for bit. On a CPU engine the weights already live in host
  memory and stay where they are.
* ``sleep(level=2)``: the KV cache and the weights are discarded. After ``wake_up`` the caller loads weights
  before generating (an RL loop does so after every training step anyway); until every parameter has been written
  the engine refuses to run, rather than generate from uninitialised memory.
* ``wake_up(tags)``: "weights" and "kv_cache" can be woken separately. slime's order is weights first, then the
  weight update, then the cache, so that the update never has the cache's memory taken already.

The engine must be idle to sleep (no unfinished requests): the cache holds their state. Everything derived from
the cache or the weights' addresses goes with them: the prefix cache (its blocks are gone), CUDA graphs (they
captured the old addresses; they are captured again on first use) and cached dequantised FP8 weights.
"""

from __future__ import annotations

import torch

__all__ = ["SleepMode", "SLEEP_TAGS"]

SLEEP_TAGS = ("weights", "kv_cache")


class SleepMode:
    """The sleep state of one ``LLMEngine`` (its ``model``, ``kv_cache``, ``block_manager``, ``runner``)."""

    def __init__(self, engine):
        self.engine = engine
        self.level = 0  # the deepest level slept at since the last full wake-up (0: awake)
        self.asleep: set[str] = set()  # the tags now released
        self._layout: dict[str, tuple] = {}  # parameter -> (shape, stride, dtype) of its device tensor
        self._host: dict[str, torch.Tensor] = {}  # level 1 on an accelerator: host copies of the weights
        self._unloaded: dict[str, int] | None = None  # level 2 after wake-up: parameter -> version at allocation

    @property
    def is_sleeping(self) -> bool:
        return bool(self.asleep)

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.engine.model.named_parameters())  # shared (tied) parameters once

    # ------------------------------------------------------------------------------------------ sleep
    def sleep(self, level: int = 1) -> None:
        if level not in (1, 2) or isinstance(level, bool):
            raise ValueError(f"sleep level must be 1 (offload weights) or 2 (discard weights), got {level!r}")
        eng = self.engine
        if eng.has_unfinished_requests() or eng.requests:
            raise RuntimeError(f"cannot sleep with {len(eng.requests)} unfinished request(s): their state is in the "
                               f"KV cache; finish or abort them first")
        if not self._reloaded():
            level = 2  # woken from a level-2 sleep and never loaded: the weights hold nothing worth keeping
        if "kv_cache" not in self.asleep:
            if eng.runner.graphs is not None:
                eng.runner.graphs.reset()  # replays would read and write the released stores
            eng.block_manager.reset_prefix_cache()  # the blocks' contents are about to be gone
            eng.kv_cache.release()
            self.asleep.add("kv_cache")
        if "weights" not in self.asleep or (level == 2 and self.level == 1):
            self._release_weights(level)
            self.asleep.add("weights")
        self.level = max(self.level, level)
        _empty_device_cache(eng.device)

    def _release_weights(self, level: int) -> None:
        dev = self.engine.device
        if level == 1 and dev.type == "cpu":
            return  # already in host memory: nothing to offload, and the same tensors are kept
        params = self._params()
        if not self._layout:
            self._layout = {n: (tuple(p.shape), p.stride(), p.dtype) for n, p in params.items()}
        pin = dev.type == "cuda"
        for name, p in params.items():
            if level == 1:
                host = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cpu", pin_memory=pin)
                self._host[name] = host.copy_(p.data)
            # Replace the storage, not the Parameter: the modules (and anything holding them) keep their references
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        if level == 2:
            self._host.clear()
        for m in self.engine.model.modules():
            m.__dict__.pop("_absorbed_fp8", None)  # dequantised from the old storage (glm5/model/mla.py)
            m.__dict__.pop("_packed_onednn", None)  # the head's packed copy (glm5/engine/cpu_layout.py)

    # ----------------------------------------------------------------------------------------- wake up
    def wake_up(self, tags=None) -> None:
        tags = list(SLEEP_TAGS) if tags is None else [tags] if isinstance(tags, str) else list(tags)
        bad = [t for t in tags if t not in SLEEP_TAGS]
        if bad:
            raise ValueError(f"unknown wake_up tag(s) {bad}; expected a subset of {list(SLEEP_TAGS)}")
        if "weights" in tags and "weights" in self.asleep:
            self._restore_weights()
            self.asleep.discard("weights")
        if "kv_cache" in tags and "kv_cache" in self.asleep:
            self.engine.kv_cache.allocate()
            self.asleep.discard("kv_cache")
        if not self.asleep:
            self.level = 0

    def _restore_weights(self) -> None:
        if not self._layout:  # level 1 on CPU: nothing was moved
            return
        dev = self.engine.device
        params = self._params()
        for name, p in params.items():
            shape, stride, dtype = self._layout[name]
            # the same strides as before: the CPU layout tuning (glm5/engine/cpu_layout.py) chose them
            fresh = torch.empty_strided(shape, stride, dtype=dtype, device=dev)
            host = self._host.pop(name, None)
            if host is not None:
                fresh.copy_(host, non_blocking=True)
            elif fresh.is_floating_point():
                fresh.fill_(float("nan"))  # level 2: marks what no loader has written yet (see check_ready)
            p.data = fresh
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the host copies must land before the pinned buffers are freed
        if self.level == 2:  # nothing was kept: every parameter must be written before the engine runs
            self._unloaded = {n: p._version for n, p in params.items()}
        self._layout = {}

    # ------------------------------------------------------------------------------------------ checks
    def check_ready(self) -> None:
        """Raise unless the engine can run a step: awake, and after a level-2 sleep, every weight loaded again."""
        if self.asleep:
            raise RuntimeError(f"the engine is asleep ({', '.join(sorted(self.asleep))} released): call "
                               f"wake_up() first")
        missing = self._missing()
        if missing:
            raise RuntimeError(f"sleep(level=2) discarded the weights and {len(missing)} parameter(s) have not "
                               f"been loaded since wake_up (e.g. {missing[:3]}); load the weights first")

    def _missing(self) -> list[str]:
        """After a level-2 wake-up: the parameters no loader has written yet (none once all have been)."""
        if self._unloaded is None:
            return []
        params = self._params()
        missing = [n for n, v in self._unloaded.items() if not _written(params[n], v)]
        if not missing:
            self._unloaded = None
        return missing

    def _reloaded(self) -> bool:
        """No level-2 wake-up is waiting for weights (checked now, not at the next step: weights loaded and then
        slept on again at level 1 must be kept)."""
        return self._unloaded is None or not self._missing()


def _written(p: torch.Tensor, version: int) -> bool:
    """Has ``p`` been loaded since wake-up? ``copy_`` into the parameter or its state_dict tensor bumps its version
    counter; ``p.data.copy_`` (a common loader idiom) does not, but overwrites the NaN it was filled with."""
    if p._version != version:
        return True
    return p.is_floating_point() and not bool(torch.isnan(p.detach()).any())


def _empty_device_cache(device: torch.device) -> None:
    """Return freed blocks from torch's caching allocator to the device, so another process can use them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
