"""Admin routes that let an external RL trainer drive the server as its rollout engine (off by default).

verl / OpenRLHF drive vLLM servers through vLLM's dev-mode routes and slime drives SGLang servers the same way:
between rollout phases the trainer puts the engine to sleep (its memory goes to the trainer), then loads the new
policy and wakes it. Two ``glm5 serve`` flags turn the routes on; without them they do not exist (404), because
each one changes what the server holds for every client:

``--enable-sleep-mode`` (vLLM's names and shapes)
    ``POST /sleep?level=1|2``, ``POST /wake_up[?tags=weights&tags=kv_cache]``, ``GET /is_sleeping``,
    ``POST /reset_prefix_cache``. Level 1 releases the KV cache and offloads the weights to host memory; level 2
    discards the weights, which must then be loaded again (``/update_weights_from_disk``) before generating.
``--enable-weight-updates`` (SGLang's shape)
    ``POST /update_weights_from_disk {"model_path": DIR, "abort_all_requests": false}``: the weights of a
    checkpoint of the same architecture, loaded in place; answers ``{"success", "message", "weight_version"}``.

Rules the routes keep:

* The engine only changes between two of its steps with nothing running. Sleeping or loading weights while
  requests are in flight is refused (409) rather than cutting them off; ``abort_all_requests`` makes the update
  abort them first (their streams end with finish_reason "abort").
* While the engine is asleep, being loaded, or holds no weights after a level-2 sleep, generation requests get 503
  with a message that says which (the gate, :meth:`Admin.check_open`); ``/health`` stays 200 (the process is
  alive; vLLM does the same) and says ``"status": "sleeping"`` / ``"updating"`` with ``"is_sleeping"``.
* A weight update never half-happens: the checkpoint is loaded into a host-memory staging copy by the same loader
  as ``glm5 serve --model`` (``load_pretrained``, so FP8 checkpoints load as the server's ``--fp8`` mode loaded its
  own), and every name, shape and dtype is checked against the running model before one tensor is copied. A bad
  directory, a different architecture or an unreadable file is a 400 and the old weights keep serving.
* Same API key as the other routes. ``model_path`` is a path on the server's filesystem: the server reads
  whatever directory it is given, which is why the flag is off by default.

Under tensor parallelism (``torchrun --nproc-per-node N -m glm5.cli serve ... --tensor-parallel-size N``) rank 0
serves and drives, and ranks 1..N-1 repeat its model calls on their own weight shards and KV caches
(glm5.engine.parallel). Every admin operation then reaches every rank at the same point of rank 0's sequence: on
rank 0's engine thread, between two steps, rank 0 does its own (which validates: a refusal there is announced to
no one), announces it, each follower does the same (:func:`follower_handlers`), and the ranks all-gather their
outcomes before rank 0 answers (``glm5.engine.parallel.announced`` keeps the idle-heartbeat out of that exchange).

* A weight update reads, on each rank, only that rank's slice of the checkpoint (``load_pretrained(...,
  tensor_parallel=...)``): one shard of staging memory per rank, never N whole models on one host. Rank 0 stages
  and checks its slice first, beside the running engine (the shard headers against the unsplit shapes, then its
  slice against its running shard), so a bad checkpoint is still a 400 that no follower hears of. Then, with
  generation paused (503 ``updating_weights``), the followers read their slices, and the update is two-phase: no
  rank copies unless every rank staged its slice. A follower that cannot read (a disk error after rank 0's checks)
  is a 500 naming the rank, and no rank has changed. A copy that then fails on some rank (a device error) leaves
  the ranks on a mix of checkpoints: as after a failed copy in one process, generation is refused
  (``weights_not_loaded``) until an update succeeds on every rank.
* sleep / wake_up / reset_prefix_cache: a follower that fails (its KV cache cannot be allocated again, say) makes
  a 500 naming the rank; the ranks' sleep states differ then, so generation is refused (``ranks_disagree``,
  ``/health`` "degraded") until an admin operation leaves them all in one state (the same wake_up again, say).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError
from .serving import Generation, ServerState

log = logging.getLogger("glm5.serve")

# config.json fields that do not change what the weights compute: ids and bookkeeping (the tokenizer and the
# stop ids stay the running server's), the loader's dtype (staging uses the running model's), and MTP (its
# presence is checked through the tensor names instead)
_CONFIG_IGNORED = {"dtype", "eos_token_id", "pad_token_id", "bos_token_id", "use_cache", "architectures",
                   "initializer_range", "head_dim", "attention_dropout", "num_nextn_predict_layers", "extra"}
_DRAIN_TIMEOUT_S = 30.0  # abort_all_requests: how long aborted requests get to end their streams


@dataclass(frozen=True)
class AdminOptions:
    sleep_mode: bool = False  # --enable-sleep-mode
    weight_updates: bool = False  # --enable-weight-updates

    @property
    def any(self) -> bool:
        return self.sleep_mode or self.weight_updates


class UpdateWeightsFromDiskRequest(BaseModel):
    # SGLang's request has more fields (load_format, weight_version, is_async, ...); slime sends some of them.
    # They are accepted and have no effect here, so the same client works unchanged.
    model_config = ConfigDict(extra="ignore")
    model_path: str = Field(min_length=1, max_length=4096, description="checkpoint directory on the server")
    abort_all_requests: bool = Field(False, description="abort requests in flight instead of answering 409")


class UpdateWeightsResponse(BaseModel):
    success: bool
    message: str
    weight_version: int


class _Refused(Exception):
    """An admin request the server cannot do now or with this input: its status and message."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Admin:
    """What the admin routes share: the engine, the generation gate, the weight version."""

    def __init__(self, state: ServerState, options: AdminOptions):
        backend = state.backend
        if not (hasattr(backend, "llm") and hasattr(backend, "engine")):
            raise ValueError("the admin routes need the engine backend (glm5.serve.backend.EngineBackend)")
        self.state = state
        self.options = options
        self.llm = backend.llm
        self.engine = backend.engine
        self.tp = backend.engine.tp  # world > 1: rank 0 of a tensor-parallel server; the followers run follower_handlers
        self.lock = asyncio.Lock()  # one admin operation at a time: they would undo each other's checks
        # "sleeping" / "updating" while the engine goes to sleep or takes new weights: generation requests that
        # arrive meanwhile are refused here rather than reach an engine that is about to refuse them
        self.closing: str | None = None
        self.needs_weights = False  # a level-2 sleep discarded them and no update has loaded them since
        self.weight_version = 0  # successful weight updates since the server started
        # tensor parallelism: a follower failed an operation rank 0 did, so their sleep states differ (what failed)
        self.ranks_apart: str | None = None
        self._generations: weakref.WeakSet[Generation] = weakref.WeakSet()
        m = state.metrics
        m.is_sleeping.fn = lambda: float(self.engine.is_sleeping())
        m.weight_version.fn = lambda: float(self.weight_version)

    # ------------------------------------------------------------------------------------ the gate
    def check_open(self) -> None:
        """503 for a generation request the engine cannot serve now. Called right before a request is admitted,
        with no await in between, so a request is either refused here or counted by :meth:`in_flight`."""
        if self.closing == "updating":
            raise APIError(503, "The server is loading new weights; retry shortly.", code="updating_weights",
                           headers={"Retry-After": "1"})
        if self.closing == "sleeping" or self.engine.is_sleeping():
            raise APIError(503, "The engine is asleep (POST /sleep): generation resumes after POST /wake_up.",
                           code="engine_sleeping")
        if self.ranks_apart:
            raise APIError(503, f"The tensor-parallel ranks disagree after a failed {self.ranks_apart}: retry it "
                                "(POST /wake_up, /sleep) until it succeeds.", code="ranks_disagree")
        if self.needs_weights:
            raise APIError(503, "sleep(level=2) discarded the weights: load them with POST /update_weights_from_disk "
                                "before generating.", code="weights_not_loaded")

    def track(self, gen: Generation) -> None:
        """Count an admitted generation until it ends. A streaming one is admitted before its body starts (and
        only then shows in the engine or in ``metrics.in_flight``); weak references let a stream that never
        started drop out when its response is dropped."""
        self._generations.add(gen)

    def in_flight(self) -> int:
        started = max(self.state.metrics.in_flight, len(self.engine.requests))
        live = self._live()
        if live > started:
            gc.collect()  # a stream dropped before its body started may wait in a reference cycle: not in flight
            live = self._live()
        return max(live, started)

    def _live(self) -> int:
        return sum(1 for g in list(self._generations) if not g.finished and g.outcome == "ok")

    def status(self) -> str:
        """``/health``'s status: "ok" only when generation requests are being served."""
        if self.closing is not None:
            return self.closing
        if self.ranks_apart:
            return "degraded"
        return "sleeping" if self.engine.is_sleeping() or self.needs_weights else "ok"

    # ----------------------------------------------------------------------------------- engine access
    async def between_steps(self, fn, *args):
        """Run ``fn`` on the engine's worker thread, between two engine steps (AsyncLLM.run_between_steps)."""
        return await self.llm.run_between_steps(fn, *args)

    def _everywhere(self, name: str, *args) -> None:
        """On the engine thread: the engine's method ``name`` here (it validates, and raises before anything is
        announced), then under tensor parallelism the same on every follower at this point of the model calls; a
        follower's failure, or sleep states that differ afterwards, is a 500 naming the ranks."""
        getattr(self.engine, name)(*args)
        if self.tp.world == 1:
            return
        from glm5.engine.parallel import announced

        try:
            with announced(name, args, self.tp):
                outcomes = _gather_outcomes(self.engine, None)
        except Exception as e:  # the group itself failed (a follower died): not the caller's 409 / 400
            self.ranks_apart = name
            raise APIError(500, f"{name}: the tensor-parallel group failed: {type(e).__name__}: {e}",
                           code="tensor_parallel_error") from None
        self.ranks_apart = None
        problems = _disagreements(outcomes)
        if problems:
            self.ranks_apart = name
            raise APIError(500, f"{name} succeeded on rank 0 but not on every tensor-parallel rank: {problems}; "
                                "generation is refused until the ranks agree (retry the operation).",
                           code="tensor_parallel_error")

    def _refuse_busy(self, what: str) -> None:
        n = self.in_flight()
        if n:
            raise APIError(409, f"Cannot {what} with {n} request(s) in flight: their state is in the KV cache. Wait "
                                "for them to finish (or abort them) and retry.", code="requests_in_flight")

    # ---------------------------------------------------------------------------------- sleep mode
    async def sleep(self, level: int) -> dict:
        async with self.lock:
            self._refuse_busy(f"sleep (level {level})")
            self.closing = "sleeping"  # no await since the check: nothing was admitted in between
            try:
                await self.between_steps(self._everywhere, "sleep", level)
            except RuntimeError as e:  # a request reached the engine after the check: it keeps running
                raise APIError(409, f"Cannot sleep: {e}", code="requests_in_flight") from None
            except ValueError as e:
                raise APIError(400, str(e), param="level", code="invalid_value") from None
            finally:
                self.closing = None
                if self.engine.sleep_mode.level == 2:  # rank 0's weights are gone, whatever a follower did
                    self.needs_weights = True
            self.state.metrics.sleeps.inc(1, str(level))
            log.info("engine asleep (level %d)", level)
            return {"is_sleeping": self.engine.is_sleeping(), "level": level}

    async def wake_up(self, tags: list[str] | None) -> dict:
        async with self.lock:
            try:
                await self.between_steps(self._everywhere, "wake_up", tags or None)
            except ValueError as e:
                raise APIError(400, str(e), param="tags", code="invalid_value") from None
            self.state.metrics.wake_ups.inc(1, "+".join(sorted(set(tags))) if tags else "all")
            log.info("engine woken (%s)", ", ".join(tags) if tags else "all")
            return {"is_sleeping": self.engine.is_sleeping()}

    async def reset_prefix_cache(self) -> dict:
        # a running request keeps its blocks: the reset only stops later prompts from matching them
        await self.between_steps(self._everywhere, "reset_prefix_cache")
        return {"success": True}

    # ------------------------------------------------------------------------------- weight updates
    async def update_weights_from_disk(self, req: UpdateWeightsFromDiskRequest) -> JSONResponse:
        metrics = self.state.metrics
        start = time.monotonic()
        try:
            async with self.lock:
                await self._update(req)
        except _Refused as e:
            metrics.weight_updates.inc(1, {400: "rejected", 409: "conflict"}.get(e.status, "error"))
            log.log(logging.WARNING if e.status == 400 else logging.INFO, "weight update from %s refused: %s",
                    req.model_path, e.message)
            return self._update_response(e.status, False, e.message, e.code)
        except Exception as e:  # a bug or a device failure: still SGLang's body, so the trainer sees success false
            metrics.weight_updates.inc(1, "error")
            log.exception("weight update from %s failed", req.model_path)
            return self._update_response(500, False, f"weight update failed: {type(e).__name__}: {e}", "internal_error")
        metrics.weight_updates.inc(1, "success")
        msg = f"Loaded the weights of {req.model_path} in {time.monotonic() - start:.2f} s."
        log.info("%s Weight version %d.", msg, self.weight_version)
        return self._update_response(200, True, msg)

    def _update_response(self, status: int, success: bool, message: str, code: str | None = None) -> JSONResponse:
        """SGLang's body (what slime reads), with OpenAI's ``error`` object too when it failed."""
        body: dict[str, Any] = UpdateWeightsResponse(success=success, message=message,
                                                     weight_version=self.weight_version).model_dump()
        if not success:
            body["error"] = APIError(status, message, code=code).body()["error"]
        return JSONResponse(body, status_code=status)

    async def _update(self, req: UpdateWeightsFromDiskRequest) -> None:
        path = Path(req.model_path)
        if not path.is_dir():
            raise _Refused(400, f"model_path {req.model_path!r} is not a directory on the server.", "invalid_value")
        self._check_weights_awake()
        if not req.abort_all_requests and self.in_flight():  # before the slow part: fail fast
            raise _Refused(409, self._busy_message(), "requests_in_flight")
        # the slow part, off the event loop and beside the engine (it reads files into new tensors only)
        staged = await asyncio.to_thread(self._stage, path)
        self.closing = "updating"  # from here until the copy is done, generation requests are refused
        try:
            if self.in_flight():
                if not req.abort_all_requests:
                    raise _Refused(409, self._busy_message(), "requests_in_flight")
                await self._abort_all()
            try:
                await self.between_steps(self._apply, staged, str(path))
            except _Refused:
                raise  # refused before copying anything
            except BaseException:
                self.needs_weights = True  # a copy that failed halfway: the model is a mix of two checkpoints
                raise
            self.weight_version += 1
            self.needs_weights = False
        finally:
            self.closing = None

    def _busy_message(self) -> str:
        return (f"Cannot update the weights with {self.in_flight()} request(s) in flight; wait for them to finish "
                "or send abort_all_requests: true.")

    def _check_weights_awake(self) -> None:
        if "weights" in self.engine.sleep_mode.asleep:
            raise _Refused(409, "The weights are asleep: POST /wake_up?tags=weights first, then update them "
                                "(then wake the KV cache).", "weights_asleep")

    def _stage(self, path: Path) -> dict[str, torch.Tensor]:
        return stage_checkpoint(self.engine, path)

    async def _abort_all(self) -> None:
        """Abort every request and wait until their streams have ended (finish_reason "abort")."""
        deadline = time.monotonic() + _DRAIN_TIMEOUT_S
        while self.in_flight():
            if time.monotonic() > deadline:
                raise _Refused(409, f"{self.in_flight()} aborted request(s) did not end within {_DRAIN_TIMEOUT_S:.0f} s.",
                               "requests_in_flight")
            for rid in list(self.engine.requests):  # again each round: a stream that started late adds its own
                await self.llm.abort(rid)
            await asyncio.sleep(0.01)

    def _apply(self, staged: dict[str, torch.Tensor], path: str) -> None:
        """On the engine thread: copy the staged tensors into the model and forget the prefix cache; under tensor
        parallelism on every rank, each its own slice of ``path`` (:func:`_commit_shards`)."""
        eng = self.engine
        if eng.requests:  # cannot happen with the gate closed; refuse rather than change weights under a request
            raise _Refused(409, f"{len(eng.requests)} request(s) reached the engine; retry the update.",
                           "requests_in_flight")
        self._check_weights_awake()
        if self.tp.world > 1:
            from glm5.engine.parallel import announced

            with announced("update_weights_from_disk", (path,), self.tp):
                _commit_shards(eng, staged, None, path)
            return
        # in place (glm5/model/weights.py: storage and strides kept, every name and shape checked before the first
        # copy), then the prefix cache is forgotten: its entries hold latents computed by the old weights
        eng.load_weights(staged)


def stage_checkpoint(engine, path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint at ``path`` as a host-memory state dict, after checking its config and every tensor against
    the running model (raises :class:`_Refused`; nothing of the running model is touched). A tensor-parallel rank
    reads only its own slice of each split tensor, and checks it against its own running shard; the unsplit shapes
    are checked from the shard headers first (glm5.checkpoint.preflight), so every rank's slice is checked whole."""
    from glm5.checkpoint.hf import load_pretrained
    from glm5.config import GLM5Config

    model = engine.model
    try:
        cfg = GLM5Config.from_pretrained(path)
    except Exception as e:  # missing or invalid config.json: not a checkpoint
        raise _Refused(400, f"{path} is not a checkpoint: {e}", "invalid_checkpoint") from None
    _check_config(model.config, cfg)
    own = model.state_dict()
    fp8 = "keep" if any(k.endswith("_scale_inv") for k in own) else "dequantize"  # as the server loaded its own
    tp = engine.tp if engine.tp.world > 1 else None
    try:
        # the running config, so the shard headers are checked against the running architecture before any
        # allocation (glm5.checkpoint.preflight), and the MTP layer is skipped or not as it was at startup
        staged = load_pretrained(path, dtype=_model_dtype(model), device="cpu", config=model.config, fp8=fp8,
                                 tensor_parallel=tp)
    except Exception as e:  # bad or mismatched files, unreadable shards: the input's fault
        raise _Refused(400, f"cannot load {path}: {e}", "invalid_checkpoint") from None
    state = {k: v.detach() for k, v in staged.state_dict().items()}
    _check_layout(own, state)
    return state


def _model_dtype(model) -> torch.dtype:
    """The dtype the server loaded its weights in (the embedding's: never FP8, never the fp32 router bias)."""
    return model.model.embed_tokens.weight.dtype


def _check_config(running, new) -> None:
    diffs = [f"{name}: running {getattr(running, name)!r}, checkpoint {getattr(new, name)!r}"
             for name in [*running.__dataclass_fields__, "mlp_layer_types", "layer_indexer_types"]
             if name not in _CONFIG_IGNORED and getattr(running, name) != getattr(new, name)]
    if diffs:
        raise _Refused(400, "the checkpoint's config.json describes a different model: " + "; ".join(diffs[:5])
                       + (f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""), "config_mismatch")


def _check_layout(own: dict[str, torch.Tensor], staged: dict[str, torch.Tensor]) -> None:
    """Every running tensor has a staged one of the same shape and dtype, and nothing else is staged."""
    missing = sorted(set(own) - set(staged))
    extra = sorted(set(staged) - set(own))
    wrong = [f"{k}: {tuple(staged[k].shape)} {staged[k].dtype}, running {tuple(v.shape)} {v.dtype}"
             for k, v in own.items() if k in staged and (staged[k].shape != v.shape or staged[k].dtype != v.dtype)]
    problems = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else []) + wrong[:3]
    if problems:
        raise _Refused(400, "the checkpoint does not match the running model: " + "; ".join(problems),
                       "config_mismatch")


# ========================================================================================= tensor parallelism
def _error_text(e: BaseException) -> str:
    return e.message if isinstance(e, _Refused) else f"{type(e).__name__}: {e}"


def _gather_outcomes(engine, error: str | None) -> list[tuple[str | None, tuple[str, ...]]]:
    """Every rank's (error or None, released sleep tags) after an operation, on every rank (a collective)."""
    import torch.distributed as dist

    if engine.device.type == "cuda":
        torch.cuda.set_device(engine.device)  # NCCL stages the pickled objects on the current device
    got: list = [None] * engine.tp.world
    dist.all_gather_object(got, (error, tuple(sorted(engine.sleep_mode.asleep))), group=engine.tp.group)
    return got


def _disagreements(outcomes) -> str:
    """What went wrong across the ranks ("" when each succeeded and all are in one sleep state)."""
    failed = [f"rank {r}: {err}" for r, (err, _) in enumerate(outcomes) if err]
    if not failed and len({asleep for _, asleep in outcomes}) > 1:
        failed = ["sleep states " + ", ".join(f"rank {r}: {list(a) or 'awake'}" for r, (_, a) in enumerate(outcomes))]
    return "; ".join(failed)


def _commit_shards(engine, staged: dict[str, torch.Tensor] | None, error: str | None, path: str) -> None:
    """Every rank at the same point, each with its staged slice of ``path`` (or why it has none): a two-phase copy.
    The ranks first agree that every one has staged; only then does each copy its slice in place, and they agree
    again. Raises on rank 0 (followers' failures come back to it by name): :class:`_Refused` 500 when a rank could
    not stage (no rank copied anything), RuntimeError when a copy failed (the ranks hold a mix of checkpoints)."""
    problems = _disagreements(_gather_outcomes(engine, error))
    if problems:
        raise _Refused(500, f"not every tensor-parallel rank could load its slice of {path} ({problems}); no rank "
                            "changed its weights", "tensor_parallel_error")
    try:
        _copy_shard(engine, staged)
        error = None
    except Exception as e:  # noqa: BLE001  (told to every rank)
        error = _error_text(e)
    problems = _disagreements(_gather_outcomes(engine, error))
    if problems:
        raise RuntimeError(f"copying the new weights failed on a tensor-parallel rank ({problems}): the ranks hold a "
                           "mix of two checkpoints until an update succeeds")


def _copy_shard(engine, staged: dict[str, torch.Tensor]) -> None:
    """A rank's staged slice into its model, in place (already this rank's slices, checked name by name against
    its shard by :func:`_check_layout`), then the prefix cache is forgotten."""
    engine.load_weights(staged, sharded=True)


def follower_handlers(engine) -> dict:
    """What a follower rank of ``glm5 serve --tensor-parallel-size N`` runs when rank 0 announces an admin
    operation (glm5.engine.parallel.follow): the same engine method on its own shard and cache, then its outcome
    all-gathered with the other ranks'. Nothing raises here: a follower that left its loop would break the group,
    so its failures travel to rank 0, which answers for them."""
    def same(name):
        def run(*args):
            try:
                getattr(engine, name)(*args)
                error = None
            except Exception as e:  # noqa: BLE001  (reported by rank 0)
                log.exception("tensor-parallel rank %d: %s failed", engine.tp.rank, name)
                error = _error_text(e)
            _gather_outcomes(engine, error)
        return run

    def update_weights_from_disk(path: str) -> None:
        staged, error = None, None
        try:
            with torch.inference_mode(False):  # the loader builds a model: the follower loop runs in inference mode
                staged = stage_checkpoint(engine, Path(path))
        except Exception as e:  # noqa: BLE001  (reported by rank 0)
            error = _error_text(e)
        try:
            _commit_shards(engine, staged, error, path)
        except Exception as e:  # noqa: BLE001  (rank 0 raised the same and answers for it)
            log.warning("tensor-parallel rank %d: weight update from %s failed: %s", engine.tp.rank, path, e)

    return {"sleep": same("sleep"), "wake_up": same("wake_up"), "reset_prefix_cache": same("reset_prefix_cache"),
            "update_weights_from_disk": update_weights_from_disk}


# ===================================================================================================== routes
def install(app: FastAPI, admin: Admin, auth: list) -> None:
    """Add the routes the options turn on (the others stay absent: 404)."""
    errors = {code: {"description": "OpenAI-shaped error"} for code in (400, 401, 409)}
    if admin.options.sleep_mode:
        _install_sleep_routes(app, admin, auth, errors)
    if admin.options.weight_updates:
        @app.post("/update_weights_from_disk", dependencies=auth, response_model=UpdateWeightsResponse,
                  responses={**errors, 400: {"description": "bad checkpoint; the old weights keep serving"}})
        async def update_weights_from_disk(req: UpdateWeightsFromDiskRequest):
            """SGLang's weight update: the checkpoint in ``model_path`` replaces the running weights in place."""
            return await admin.update_weights_from_disk(req)


def _install_sleep_routes(app: FastAPI, admin: Admin, auth: list, errors: dict) -> None:
    @app.post("/sleep", dependencies=auth, responses=errors)
    async def sleep(level: int = Query(1, ge=1, le=2, description="1: offload the weights; 2: discard them")):
        """vLLM's sleep: release the KV cache and the weights' device memory (409 while requests run)."""
        return await admin.sleep(level)

    @app.post("/wake_up", dependencies=auth, responses=errors)
    async def wake_up(tags: list[str] | None = Query(None, description="weights and/or kv_cache (default both)")):
        """vLLM's wake_up: take back what /sleep released, all of it or the tagged part."""
        return await admin.wake_up(tags)

    @app.get("/is_sleeping", dependencies=auth, responses=errors)
    async def is_sleeping():
        return {"is_sleeping": admin.engine.is_sleeping()}

    @app.post("/reset_prefix_cache", dependencies=auth, responses=errors)
    async def reset_prefix_cache():
        """Forget the prefix cache (vLLM's route; the weight update does this itself)."""
        return await admin.reset_prefix_cache()
