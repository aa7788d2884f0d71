"""The training run's checkpoints: RUN_DIR/checkpoints/<step> (orbax, asynchronous, last K)."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class RunCheckpoints:
    """The training run's checkpoints under RUN_DIR/checkpoints/<step>: the train state
    (trainable parameters, optimizer state, step) and a JSON of where the data stands.
    Saves are asynchronous (the step goes on while orbax writes); the last `keep` stay."""

    def __init__(self, run_dir: str, keep: int = 3):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(run_dir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state):
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
