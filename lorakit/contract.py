"""The arch contract suite: one named check per property every arch plugin must have.

DESIGN rule 8: hooks are the contract, checked the way a user meets them. Each name in
:data:`CONTRACT_CHECKS` is a function ``check_<name>`` of :mod:`lorakit.contract_checks`
that :class:`ArchContract` runs (``contract.check(name)``). A check returns figures (a
dict), raises :class:`ContractFailure` (an ``AssertionError`` naming the check and the
hook responsible), or raises :class:`NotOffered` when the arch lacks the capability it
needs (reported, never passed silently). The checks of an arch share one tiny model and
one short training run; runs are fp32. Reloads are judged by model outputs
(:mod:`lorakit.contract_outputs`). Nothing here imports torch until a check runs, and no
arch or mode is named: modes are checked through recipes (:func:`register_mode_recipe`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from lorakit.contract_checks import CHECKS, HOOKS

#: Every check, in the order :meth:`ArchContract.run_all` runs them.
CONTRACT_CHECKS = tuple(CHECKS)
#: ``{mode id: recipe}``, see :func:`register_mode_recipe`.
MODE_RECIPES: dict = {}


class NotOffered(Exception):
    """The arch does not offer what a check needs; the message names the missing capability."""


class ContractFailure(AssertionError):
    """A failed contract check; ``check`` and ``hooks`` name it and the hook(s) responsible."""

    def __init__(self, check: str, hooks, message: str):
        self.check, self.hooks = check, (hooks,) if isinstance(hooks, str) else tuple(hooks)
        super().__init__(f"contract check '{check}' failed (hook {' / '.join(self.hooks)}): {message}")


def register_mode_recipe(mode: str, recipe) -> None:
    """Teach the ``modes`` check to run ``mode`` briefly on any arch: ``recipe(contract, folder)``
    trains with :meth:`ArchContract.train` (``modes=[mode]`` and the mode's options) and returns
    figures; it may raise :class:`NotOffered`. An installed mode without a recipe is reported."""
    MODE_RECIPES[mode] = recipe


class ArchContract:
    """The contract checks of one arch, sharing one tiny model and one training run.

    ``workdir`` receives the model and every run; ``data`` defaults to lorakit's bundled
    images; ``overrides`` are TrainConfig values for every run (defaults: rank 4, alpha 8,
    4 steps, a checkpoint every 2, text-encoder LoRA where the arch supports it). ``atol``
    bounds a reload's output difference; ``modes`` maps mode ids to recipes (default
    :data:`MODE_RECIPES`). Run one check with :meth:`check` (:meth:`verify` under pytest)
    or all with :meth:`run_all`.
    """

    def __init__(self, arch: str, workdir, data=None, *, modes=None, atol: float = 1e-5, **overrides):
        from lorakit.plugins import get_plugin_manager

        self.arch, self.workdir, self.data, self.atol, self._modes = arch, Path(workdir), data, atol, modes
        self.pm = get_plugin_manager(arch)
        self.info = self.pm.hook.arch_info()
        self.settings = dict(rank=4, alpha=8, max_steps=4, checkpoint_every=2,
                             train_text_encoder=bool(self.info.text_encoders), **overrides)
        self.size = int(self.settings.get("resolution") or 32)
        self._shared: dict = {}
        self._current = "setup"

    # ------------------------------------------------------------------ shared pieces
    def offers(self, *hooks: str) -> bool:
        """True when the arch implements every one of ``hooks``."""
        return all(getattr(self.pm.hook, h).get_hookimpls() for h in hooks)

    def fail(self, hooks, message: str):
        """Raise :class:`ContractFailure` for the running check, naming ``hooks``."""
        raise ContractFailure(self._current, hooks, message)

    def not_offered(self, why: str):
        """Raise :class:`NotOffered`: the arch lacks what the running check needs (``why`` names it)."""
        raise NotOffered(why)

    @property
    def recipes(self) -> dict:
        """The mode recipes this contract runs: its own ``modes``, else :data:`MODE_RECIPES`."""
        return MODE_RECIPES if self._modes is None else self._modes

    @contextlib.contextmanager
    def calling(self, *hooks: str):
        """An unexpected exception inside the block fails the running check, naming ``hooks``."""
        try:
            yield
        except (ContractFailure, NotOffered):
            raise
        except Exception as exc:
            raise ContractFailure(self._current, hooks, f"{type(exc).__name__}: {exc}") from exc

    def _once(self, key: str, make, hooks):
        """``make()`` once per contract; a failure is kept and fails every check that needs it."""
        if key not in self._shared:
            try:
                self._shared[key] = (True, make())
            except Exception as exc:
                self._shared[key] = (False, f"{type(exc).__name__}: {exc}")
        ok, value = self._shared[key]
        if not ok:
            self.fail(hooks, f"the shared {key} failed: {value}")
        return value

    @property
    def model(self) -> Path:
        """The tiny model folder, written once by the arch's ``write_tiny_model``."""
        from lorakit.tiny import make_tiny_model

        return self._once("tiny model", lambda: make_tiny_model(self.arch, self.workdir / "model"), "write_tiny_model")

    def config(self, output, data=..., **overrides):
        """The TrainConfig of a contract run into ``output`` (``data=None``: a mode brings its own)."""
        from lorakit.testing import example_data, tiny_config

        data = (self.data or example_data()) if data is ... else data
        return tiny_config(self.arch, self.model, data, output, **{**self.settings, **overrides})

    def train(self, output, data=..., **overrides):
        """Train a contract run into ``output``; returns ``(trainer, TrainResult)``."""
        from lorakit.training import Trainer

        trainer = Trainer(self.config(output, data, **overrides)).setup()
        return trainer, trainer.run()

    @property
    def fresh(self):
        """``(validated config, components)`` from the arch's ``load_components``, no LoRA."""
        import torch

        from lorakit.config import validate

        def load():
            config = validate(self.config(self.workdir / "fresh"))
            return config, self.pm.hook.load_components(model_path=self.model, config=config, device="cpu",
                                                        weight_dtype=torch.float32)

        return self._once("model load", load, "load_components")

    @property
    def trainer(self):
        """The shared run's Trainer, set up (model loaded, LoRA injected, inputs cached)."""
        from lorakit.training import Trainer

        return self._once("set-up", lambda: Trainer(self.config(self.workdir / "straight")).setup(),
                          ("load_components", "target_modules", "encode_images", "encode_prompt"))

    @property
    def trained(self):
        """The shared run's TrainResult after ``max_steps``; :attr:`trainer` then holds the LoRA."""
        trainer = self.trainer
        return self._once("training run", trainer.run, ("compute_loss", "save_lora"))

    # ------------------------------------------------------------------ running checks
    def check(self, name: str) -> dict:
        """Run check ``name`` (one of :data:`CONTRACT_CHECKS`) and return its figures."""
        if name not in CONTRACT_CHECKS:
            raise ValueError(f"unknown contract check {name!r}; choose from {', '.join(CONTRACT_CHECKS)}")
        self._current = name
        with self.calling(*HOOKS[name]):
            return CHECKS[name](self)

    def verify(self, name: str) -> dict:
        """:meth:`check` for pytest: a capability the arch does not offer becomes a skip naming it."""
        import pytest

        try:
            return self.check(name)
        except NotOffered as exc:
            pytest.skip(f"{self.arch}: {name} not offered: {exc}")

    def run_all(self) -> dict:
        """Every check: figures by check name, ``"not offered: ..."`` for a missing capability.
        Raises an AssertionError naming each failed check and its hook."""
        figures, failures = {}, []
        for name in CONTRACT_CHECKS:
            try:
                figures[name] = self.check(name)
            except NotOffered as exc:
                figures[name] = f"not offered: {exc}"
            except ContractFailure as exc:
                failures.append(exc)
        if len(failures) > 1:
            raise AssertionError(f"--arch {self.arch}: {len(failures)} contract checks failed:\n"
                                 + "\n".join(str(f) for f in failures))
        if failures:
            raise failures[0]
        return figures
