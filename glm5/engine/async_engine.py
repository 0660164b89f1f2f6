"""``AsyncLLM``: the asyncio front end (what an OpenAI-compatible server drives).

    llm = AsyncLLM.from_pretrained("ckpt", max_num_seqs=32)
    async for out in llm.generate("Hello", SamplingParams(max_tokens=64), request_id="r1"):
        print(out.outputs[0].text, end="")          # a delta: only the new text / token ids
    await llm.abort("r1")                            # from anywhere: ends the stream with finish_reason "abort"

One background task runs the engine: each ``LLMEngine.step()`` executes in a worker thread, so the event
loop stays responsive while the model computes. New requests and aborts are queued and applied between
steps (requests join and leave the running batch at step boundaries). Cancelling or closing a
``generate`` iterator aborts its request and frees its cache blocks.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from glm5.engine.llm import build_engine
from glm5.engine.llm_engine import LLMEngine
from glm5.engine.outputs import RequestOutput
from glm5.engine.sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._pending: list[tuple] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm5-engine")
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self._error: BaseException | None = None

    @classmethod
    def from_pretrained(cls, model, tokenizer=None, device=None, dtype=None, **engine_kwargs) -> "AsyncLLM":
        """model: checkpoint directory or GLM5ForCausalLM; keyword arguments are EngineConfig fields."""
        return cls(build_engine(model, tokenizer, device, dtype, **engine_kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # ------------------------------------------------------------------------------------------ API
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream one request: yields RequestOutputs holding only what is new (text, token_ids, logprobs);
        the last one has ``finished=True`` and the finish reason. Raises ValueError for an invalid request.
        ``priority``: lower is served sooner, for an engine with ``scheduling_policy="priority"``."""
        if self._error is not None:
            raise RuntimeError("engine loop died") from self._error
        rid = request_id or uuid.uuid4().hex
        if rid in self._queues:
            raise ValueError(f"request id {rid!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        self._submit(("add", rid, prompt, sampling_params or SamplingParams(), priority))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:  # cancelled, closed early or failed: free the request's blocks
                self._submit(("abort", rid))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with a final output whose finish_reason is "abort"."""
        self._submit(("abort", request_id))

    async def run_between_steps(self, fn, *args):
        """``fn(*args)`` on the engine's worker thread, which runs every engine step: it sees the engine between two
        steps and never overlaps one (for changing its state: sleep, weights, the prefix cache)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def sleep(self, level: int = 1) -> None:
        """``LLMEngine.sleep`` between two steps (it needs no unfinished requests): see glm5/engine/sleep_mode.py.
        Requests submitted while asleep fail with a clear error."""
        await self.run_between_steps(self.engine.sleep, level)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await self.run_between_steps(self.engine.wake_up, tags)

    async def is_sleeping(self) -> bool:
        return self.engine.is_sleeping()

    async def reset_prefix_cache(self) -> None:
        await self.run_between_steps(self.engine.reset_prefix_cache)

    async def load_weights(self, weights, strict: bool = True) -> int:
        """``LLMEngine.load_weights`` between two steps."""
        return await self.run_between_steps(self.engine.load_weights, weights, strict)

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._executor.shutdown(wait=True)

    # -------------------------------------------------------------------------------------- engine loop
    def _submit(self, op: tuple) -> None:
        with self._lock:
            self._pending.append(op)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run())
        self._wakeup.set()

    def _has_work(self) -> bool:
        with self._lock:
            if self._pending:
                return True
        return self.engine.has_unfinished_requests()

    def _step(self) -> list:
        """Runs in the worker thread: apply queued adds/aborts, then one engine step."""
        with self._lock:
            ops, self._pending = self._pending, []
        results: list = []
        for op in ops:
            if op[0] == "add":
                _, rid, prompt, params, priority = op
                try:
                    self.engine.add_request(prompt, params, request_id=rid, priority=priority)
                except Exception as e:  # invalid request: report to that caller only
                    results.append((rid, e))
            else:
                out = self.engine.abort(op[1])
                if out is not None:
                    results.append((out.request_id, out))
        if self.engine.has_unfinished_requests():
            results.extend((o.request_id, o) for o in self.engine.step(delta=True))
        return results

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._has_work():
                    self._wakeup.clear()
                    if not self._has_work():
                        await self._wakeup.wait()
                    continue
                for rid, item in await loop.run_in_executor(self._executor, self._step):
                    q = self._queues.get(rid)
                    if q is not None:
                        q.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # engine failure: fail every open stream
            self._error = e
            for q in self._queues.values():
                q.put_nowait(RuntimeError(f"engine step failed: {e!r}"))
            raise
