"""The one small interface every continual-learning method implements (in the spirit of peft's `LoraVariant`).

`train.learn_task` runs one loop for every method: Eq. 1 on the new concept's images plus `method.loss(task, batch)`.
A method says
- how a task learner starts: `task_settings` (TaskConfig values it needs, e.g. C-LoRA's K/V targets) and
  `before_task` (e.g. start from the previous LoRA, merge the past into the base);
- what it adds to the task's loss (`loss`) and does after each optimizer step (`after_step`, CIDM's Eq. 7);
- what it does after the task (`after_task`) or when the task stops early (`abort_task`);
- which state it keeps across tasks: `load` reads it through the library, `concept_files` and `library_state` are
  what the library stores, under the method's own file names, `merged_state` joins it with another writer's, and
  `forget` drops a concept from it;
- how inference over tasks 1..g goes (`prepare_inference`): how the LoRAs meet (EWA, equal merge, composite, merged
  into the base, the latest only) and any vision context.
Each method is a dataclass whose fields are its parameters; `METHODS` (cidm/methods/__init__.py) names them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import ClassVar

import torch


@dataclasses.dataclass
class Inference:
    """How a library's method generates over tasks 1..g (GenerateConfig's merge and psi, LFS's contexts)."""

    merge: str = "ewa"
    psi: str = "paper"
    contexts: dict | None = None


@dataclasses.dataclass
class Method:
    name: str
    description: str
    merge: str = "ewa"  # how the task LoRAs meet at inference (GenerateConfig.merge)
    psi: str = "paper"  # EWA's ψ, where the merge is EWA
    weight: str | None = None  # the parameter chosen on the tuning sequence (`cidm bench --tune`)
    grid: tuple[float, ...] = (0.1, 1.0, 10.0)  # the values of `weight` tried there
    diagnostic: bool = False  # not a method of the comparison: run only when named (`--methods`)

    ABOUT: ClassVar[tuple[str, ...]] = ("name", "description", "weight", "grid", "diagnostic")
    INFERENCE: ClassVar[tuple[str, ...]] = ("merge", "psi")
    task_settings: ClassVar[dict] = {}  # TaskConfig values this method learns with
    training_cost: ClassVar[float] = 1.0  # a task's cost against a plain one (the benchmark's scheduling guess)

    # ------------------------------------------------------------------------------------------------------------
    # parameters

    def parameters(self) -> dict:
        """The method's training parameters (its fields, less description and inference)."""
        skip = self.ABOUT + self.INFERENCE
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    def settings(self) -> dict:
        """What the library records of the method: how it generates and how it learns."""
        return {k: getattr(self, k) for k in self.INFERENCE} | self.parameters()

    def training_key(self) -> tuple:
        """Methods with one key learn identically and differ only at inference (one training run serves them)."""
        return type(self).__name__, tuple(sorted(self.parameters().items()))

    @contextlib.contextmanager
    def overridden(self, **parameters):
        """Other parameter values for one task (e.g. a λ under tuning); the library's again afterwards."""
        unknown = sorted(set(parameters) - set(self.parameters()))
        if unknown:
            raise ValueError(f"{self.name} has no parameter {', '.join(unknown)}; its parameters: "
                             f"{', '.join(self.parameters()) or 'none'}")
        for k, v in parameters.items():
            check_parameter(k, getattr(self, k), v)
        before = {k: getattr(self, k) for k in parameters}
        for k, v in parameters.items():
            setattr(self, k, v)
        try:
            yield self
        finally:
            for k, v in before.items():
                setattr(self, k, v)

    # ------------------------------------------------------------------------------------------------------------
    # state across tasks

    def load(self, library) -> None:
        """Read the method's state from the library (on opening it, and after a task that failed)."""

    def forget(self, name: str) -> None:
        """Drop a concept from the state in memory (it is deleted, replaced, or was not kept)."""

    def concept_files(self, studio, config) -> dict:
        """Files to keep beside the new concept: file name -> tensors (dict) or an image."""
        return {}

    def library_state(self) -> tuple[dict, dict] | None:
        """The state kept once per library (tensors, metadata), or None."""
        return None

    def merged_state(self, library, name: str) -> tuple[dict, dict] | None:
        """`library_state` when another writer changed `library` (as it is on disk now) while task `name` learned:
        what to publish so that neither writer's tasks lose their state. By default this method's own."""
        return self.library_state()

    # ------------------------------------------------------------------------------------------------------------
    # one task

    def before_task(self, task) -> None:
        """After the new task learner exists, before the first step. Contexts entered in `task.context` last
        for the task."""

    def loss(self, task, batch) -> dict[str, tuple[float, torch.Tensor]]:
        """Terms added to Eq. 1, each as (weight, term): loss = diffusion + Σ weight · term."""
        return {}

    def after_step(self, task) -> None:
        """After each optimizer step of the task learner."""

    def after_task(self, task) -> None:
        """After the last step, with the task's LoRA still on the UNet."""

    def abort_task(self, task) -> None:
        """The task was cancelled or failed: undo what `before_task` added to the state."""

    # ------------------------------------------------------------------------------------------------------------
    # inference

    def prepare_inference(self) -> Inference:
        return Inference(self.merge, self.psi)


def check_parameter(name: str, default, value) -> None:
    """A parameter given for one task has its default's type: a switch stays a switch, a count a whole number of at
    least 1, a weight or rate a finite number of at least 0 (NaN or a negative weight would train silently wrong)."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
        want = "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and value >= 1, "a whole number of at least 1"
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
        want = "a finite number of at least 0"
    else:
        ok, want = isinstance(value, type(default)), f"a {type(default).__name__}"
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")
