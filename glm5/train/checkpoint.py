"""Training checkpoints (atomic, resumable) and the final export to the Hugging Face layout.

A checkpoint ``out/checkpoints/step_00000400/`` holds:

* ``dcp/``: model and optimiser state through ``torch.distributed.checkpoint`` (sharded under FSDP2, one
  process writes it all otherwise) — the router-bias buffers are part of the model state;
* ``rank{r}.pt``: that rank's RNG states (torch, CUDA, numpy, python);
* ``trainer_state.json``: step, data-loader position, tokens seen, elapsed time, config (written last).

Atomicity: everything is written into ``.step_00000400.tmp``, every file and the directory are fsync'ed,
and only then is the directory renamed to ``step_00000400`` (``rename`` is atomic on POSIX) and the
parent fsync'ed. A run killed at any moment leaves either a complete ``step_*`` directory or an ignored
``.tmp`` one that the next save removes. ``latest_checkpoint`` only considers complete directories.

For tests, ``GLM5_CKPT_PAUSE_AT_STEP=<step>`` makes the save of that step sleep (with its files written but
not yet committed) so a test can SIGKILL the process mid-checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from glm5.train.distributed import barrier

__all__ = ["Checkpointer", "latest_checkpoint", "export_hf", "fsync_tree"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and every directory (contents first, then the directory itself)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    steps = []
    for p in d.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").exists():
            steps.append((int(m[1]), p))
    return max(steps)[1] if steps else None


def _rng_state() -> dict:
    # tensors, tuples and numbers only, so the file loads with ``torch.load(weights_only=True)`` (no pickle code)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _dcp(fn, *args, **kwargs):
    """Run a ``torch.distributed.checkpoint`` call; its ``CheckpointException`` (a BaseException that wraps
    each rank's error, so neither ``except Exception`` nor the CLI's error line sees it) is re-raised as the
    underlying error: a KeyboardInterrupt stays an interrupt, a full disk an OSError, a missing key an error."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return fn(*args, **kwargs)
    except CheckpointException as e:
        errors = [exc for exc, _ in e.failures.values()] if isinstance(e.failures, dict) else []
        if any(isinstance(x, KeyboardInterrupt) for x in errors):
            raise KeyboardInterrupt from e
        first = next((x for x in errors if isinstance(x, Exception)), None)
        if first is None:
            raise RuntimeError(str(e)) from e
        raise first from e


class Checkpointer:
    def __init__(self, out_dir: str | os.PathLike, rank: int = 0, keep: int = 2):
        self.dir = Path(out_dir) / "checkpoints"
        self.rank, self.keep = rank, keep
        self.replaces: list[Path] = []  # an earlier run's checkpoints, deleted once this run has saved one

    def save(self, step: int, model, optimizers, trainer_state: dict) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".step_{step:08d}.tmp"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # re-saving the same step (e.g. end of a resumed run)
                shutil.rmtree(final)
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, list(optimizers))
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            _dcp(dcp.save, {"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"), no_dist=not _dist_on())
        torch.save(_rng_state(), tmp / f"rank{self.rank}.pt")
        barrier()
        if self.rank == 0:
            with open(tmp / "trainer_state.json", "w") as f:
                json.dump(trainer_state, f, indent=2)
            fsync_tree(tmp)
            pause = os.environ.get("GLM5_CKPT_PAUSE_AT_STEP")
            if pause is not None and int(pause) == step:
                (self.dir / f".paused_{step:08d}").touch()
                time.sleep(600)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
            for old in self.replaces:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
            self._prune()
        self.replaces = []
        barrier()
        return final

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        done = sorted(p for p in self.dir.iterdir() if _STEP_DIR.match(p.name))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model, optimizers) -> dict:
        """Restore model, optimiser and this rank's RNG from ``path``; return the trainer state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, list(optimizers))
        state = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _dcp(dcp.load, state, checkpoint_id=str(path / "dcp"), no_dist=not _dist_on())
        set_state_dict(model, list(optimizers), model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = path / f"rank{self.rank}.pt"
        if rng_file.exists():
            try:
                rng = torch.load(rng_file, weights_only=True)
            except pickle.UnpicklingError:  # written before the RNG file held only tensors and numbers
                warnings.warn(f"{rng_file}: an older RNG-state format that would need unpickling; RNG not restored",
                              stacklevel=2)
            else:
                _set_rng_state(rng)
        return json.loads((path / "trainer_state.json").read_text())


def export_hf(model, out_dir: str | os.PathLike, tokenizer=None, rank: int = 0, dtype: torch.dtype | None = None) -> Path | None:
    """Write the model (gathered from FSDP shards when sharded) in the HF layout that
    ``GLM5ForCausalLM.from_pretrained`` loads, plus the tokenizer; atomically (tmp dir + rename)."""
    from glm5.checkpoint.hf import save_state_dict
    from glm5.train.distributed import is_fsdp

    out = Path(out_dir)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if rank == 0:
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_state_dict(sd, model.config, tmp, dtype=dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    barrier()
    return out if rank == 0 else None
