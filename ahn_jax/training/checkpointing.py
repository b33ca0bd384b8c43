"""Orbax checkpoints of a training run: memory parameters + optimiser state + step (one pytree), the data
iterator's state and the config (JSON). Async saves, keeps the newest N, restores into abstract arrays that carry the
target shardings (DESIGN pitfall 9), and a SIGTERM flag so a preempted job saves and exits cleanly.
"""

from __future__ import annotations

import base64
import logging
import os
import signal

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _jsonable_data_state(state):
    """grain iterator states are dicts or bytes; JSON needs text."""
    if isinstance(state, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(state)).decode()}
    return state


def _from_jsonable_data_state(state):
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return base64.b64decode(state["__bytes__"])
    return state


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager with the three items a run needs."""

    def __init__(self, directory, *, keep: int = 3, every: int = 100, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(every, 1),
                                               enable_async_checkpointing=async_save, create=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "config"))

    def latest_step(self):
        return self._mgr.latest_step()

    def save(self, step: int, state, *, data_state=None, config=None, force: bool = False) -> bool:
        """Save if `step` is due (every N steps) or `force`. Returns whether a save started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"state": _jsonable_data_state(data_state)}),
            config=ocp.args.JsonSave(config or {}),
        )
        saved = self._mgr.save(step, args=args, force=force)
        if saved:
            log.info("checkpoint step %d -> %s", step, self.directory)
        return saved

    def restore(self, abstract_state, step=None):
        """Restore (state, data_state, config) at `step` (default: latest). `abstract_state` is a pytree of
        jax.ShapeDtypeStruct carrying the shardings to restore into."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        ))
        return out["state"], _from_jsonable_data_state(out["data"]["state"]), out["config"]

    def wait(self):
        self._mgr.wait_until_finished()

    def close(self):
        self._mgr.wait_until_finished()
        self._mgr.close()


def abstract_like(tree):
    """ShapeDtypeStructs with the shardings of the arrays in `tree` (restore targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class StopFlag:
    """Set by SIGTERM (preemption) or SIGINT; the loop checks it between steps, saves and exits."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. inside some test runners): no handler
                pass

    def _handle(self, signum, frame):
        log.warning("signal %d received: saving a checkpoint at the end of this step and stopping", signum)
        self.requested = True

    def restore_handlers(self):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
