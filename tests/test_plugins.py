"""The plugin system: discovery, one arch per run, clear errors for broken plugins."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

from lorakit import hookspecs, plugins
from lorakit.errors import LorakitError, PluginError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


class FakeDist:
    def __init__(self, name, version="1.0"):
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    def __init__(self, name, value, dist, obj=None, error=None):
        self.name, self.value, self.dist = name, value, FakeDist(dist)
        self._obj, self._error = obj, error

    def load(self):
        if self._error:
            raise self._error
        return self._obj


@pytest.fixture
def fake_entry_points(monkeypatch):
    """Replace installed entry points with the given fakes for one test."""

    def install(arch_eps, mode_eps=()):
        def entry_points(group):
            return {plugins.ARCH_GROUP: list(arch_eps), plugins.MODE_GROUP: list(mode_eps)}.get(group, [])

        monkeypatch.setattr(plugins.importlib.metadata, "entry_points", entry_points)
        monkeypatch.setattr(plugins, "_cache", {})

    yield install
    plugins._cache.clear()


def complete_plugin(description="toy arch"):
    from lorakit.arch import ArchInfo

    ns = types.ModuleType(f"toy_{description.replace(' ', '_')}")
    impl = hookspecs.hookimpl
    ns.arch_info = impl(lambda: ArchInfo(description=description, denoiser="net"))
    for entry in hookspecs.REQUIRED_TRAIN_HOOKS:
        name = entry if isinstance(entry, str) else entry[0]
        if name != "arch_info":
            spec_args = getattr(hookspecs, name).__code__.co_varnames[: getattr(hookspecs, name).__code__.co_argcount]
            setattr(ns, name, impl(_fn(name, spec_args)))
    return ns


def _fn(name, args):
    src = f"def {name}({', '.join(args)}):\n    return None\n"
    scope = {}
    exec(src, scope)
    return scope[name]


def test_builtin_archs_are_registered_through_entry_points():
    entries = plugins.arch_entries()
    assert "sd15" in entries
    assert entries["sd15"].distribution == "lorakit"
    assert entries["sd15"].value == "lorakit_plugins.sd15:SD15"


def test_one_arch_per_manager(fake_entry_points):
    fake_entry_points([
        FakeEntryPoint("a", "pkg_a", "dist-a", complete_plugin("A")),
        FakeEntryPoint("b", "pkg_b", "dist-b", complete_plugin("B")),
    ])
    pm = plugins.get_plugin_manager("a")
    assert pm.hook.arch_info().description == "A"
    names = [name for name, _ in pm.list_name_plugin()]
    assert "arch:a" in names and "arch:b" not in names


def test_broken_plugin_is_listed_with_its_error_and_others_still_work(fake_entry_points):
    fake_entry_points([
        FakeEntryPoint("good", "pkg_good", "dist-good", complete_plugin("fine")),
        FakeEntryPoint("bad", "pkg_bad", "dist-bad", error=ImportError("No module named 'missing_dep'")),
    ])
    rows = {r["id"]: r for r in plugins.list_archs()}
    assert rows["good"]["status"] == "ok"
    assert rows["bad"]["status"] == "broken"
    assert "missing_dep" in rows["bad"]["error"] and "dist-bad" in rows["bad"]["error"]
    with pytest.raises(PluginError, match="plugin 'bad' .*failed to import"):
        plugins.get_plugin_manager("bad")


def test_duplicate_arch_id_names_both_distributions(fake_entry_points):
    fake_entry_points([
        FakeEntryPoint("dup", "pkg_one", "dist-one", complete_plugin()),
        FakeEntryPoint("dup", "pkg_two", "dist-two", complete_plugin()),
    ])
    with pytest.raises(PluginError, match=r"registered twice \(by dist-one, dist-two\)"):
        plugins.get_plugin_manager("dup")


def test_missing_required_hook_is_named(fake_entry_points):
    plugin = complete_plugin()
    del plugin.compute_loss
    fake_entry_points([FakeEntryPoint("partial", "pkg", "dist", plugin)])
    pm = plugins.get_plugin_manager("partial")
    with pytest.raises(PluginError, match="does not implement required hook\\(s\\): compute_loss"):
        plugins.require_hooks(pm, "partial")
    assert {r["id"]: r for r in plugins.list_archs()}["partial"]["status"] == "broken"


def test_text_conditioning_hook_may_be_either_encode_prompt_or_encode_text(fake_entry_points):
    plugin = complete_plugin()
    del plugin.encode_prompt
    fake_entry_points([FakeEntryPoint("notext", "pkg", "dist", plugin)])
    with pytest.raises(PluginError, match="required hook\\(s\\): encode_prompt or encode_text"):
        plugins.require_hooks(plugins.get_plugin_manager("notext"), "notext")
    plugin.encode_text = hookspecs.hookimpl(_fn("encode_text", ["components", "captions", "encoder"]))
    plugins.require_hooks(plugins.get_plugin_manager("notext"), "notext")


def test_misspelled_hook_is_caught(fake_entry_points):
    plugin = complete_plugin()
    plugin.compute_los = hookspecs.hookimpl(lambda components: None)
    fake_entry_points([FakeEntryPoint("typo", "pkg", "dist", plugin)])
    with pytest.raises(PluginError, match="compute_los"):
        plugins.get_plugin_manager("typo")


def test_unknown_arch_lists_known(fake_entry_points):
    fake_entry_points([FakeEntryPoint("x1", "p", "d", complete_plugin())])
    with pytest.raises(PluginError, match="unknown arch 'zz'. Known archs: x1"):
        plugins.get_plugin_manager("zz")


def test_mode_classes_get_a_fresh_instance_per_run(fake_entry_points):
    class Mode:
        @hookspecs.hookimpl
        def reduce_loss(self, per_sample_loss, batch, config):
            return ("mode", id(self))

    fake_entry_points([FakeEntryPoint("a", "p", "d", complete_plugin())], [FakeEntryPoint("m", "pm", "d", Mode)])
    first = plugins.get_plugin_manager("a", ["m"]).hook.reduce_loss(per_sample_loss=None, batch=None, config=None)
    second = plugins.get_plugin_manager("a", ["m"]).hook.reduce_loss(per_sample_loss=None, batch=None, config=None)
    assert first[0] == "mode" and first[1] != second[1]


def test_runtime_registration_for_notebooks_and_tests():
    plugins.register("toy-runtime", complete_plugin("runtime"))
    try:
        assert plugins.arch_info("toy-runtime").description == "runtime"
    finally:
        plugins.unregister("toy-runtime")
    assert "toy-runtime" not in plugins.arch_entries()


# --- the contract is documented and every hook is used ------------------------------


def _spec_names():
    return [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "lorakit_spec")]


def test_every_hook_has_a_docstring():
    for name in _spec_names():
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"hookspec {name} has no docstring"


def test_every_hook_is_documented_in_the_plugin_guide():
    """Every hookspec has a section in docs/plugins.md headed by its exact signature, and no
    section documents a hook that no longer exists."""
    text = DOCS.read_text()
    names = _spec_names()
    for name in names:
        spec = getattr(hookspecs, name)
        signature = f"{name}({', '.join(spec.__code__.co_varnames[: spec.__code__.co_argcount])})"
        assert re.search(rf"^#+ `?{name}\(", text, re.M), f"docs/plugins.md has no section for {name}"
        assert re.search(rf"^#+ `?{re.escape(signature)}`?\s*$", text, re.M), (
            f"docs/plugins.md heads the {name} section with another signature than {signature}"
        )
    documented = re.findall(r"^#+ `?(\w+)\(", text, re.M)
    stale = sorted(set(documented) - set(names))
    assert not stale, f"docs/plugins.md documents hooks that are not in lorakit/hookspecs.py: {stale}"


def test_every_hook_is_called_by_lorakit():
    """A hook nobody calls is dead contract: each must be called somewhere in lorakit/."""
    source = "\n".join(p.read_text() for p in Path(hookspecs.__file__).parent.glob("*.py") if p.name != "hookspecs.py")
    for name in _spec_names():
        assert f"hook.{name}(" in source or f'"{name}"' in source, f"lorakit never calls hook {name}"


def _example_plugin():
    """The plugin in docs/plugins.md's ```python block starting ``# my_arch.py``: the arch class
    it defines (a subclass of lorakit.Arch), or the module itself for a module of hooks."""
    from lorakit import Arch

    text = DOCS.read_text()
    match = re.search(r"```python\n(# my_arch\.py\n.*?)```", text, re.S)
    assert match, "docs/plugins.md lost its complete example plugin (a ```python block starting '# my_arch.py')"
    module = types.ModuleType("my_arch")
    exec(compile(match.group(1), "my_arch.py", "exec"), module.__dict__)
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, Arch) and v.__module__ == "my_arch" and "info" in vars(v)]
    assert len(classes) <= 1, f"the docs example defines several arch classes: {classes}"
    return classes[0] if classes else module


def _first_tensor(output):
    """The tensor a denoiser's forward returned (a tensor, a tuple, or a diffusers output)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    if hasattr(output, "sample"):
        return output.sample
    return _first_tensor(next(iter(output.values())))


def _denoiser_outputs(pm, components, denoiser, batch, config, seed=0):
    """Every output of ``components[denoiser]`` while the arch's compute_loss runs on ``batch``
    with rows seeded ``seed``: the same noisy inputs for every denoiser compared."""
    import torch

    from lorakit.rng import Rows

    seen = []
    module = components[denoiser]
    handle = module.register_forward_hook(lambda _m, _args, out: seen.append(_first_tensor(out).detach().float()))
    try:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            pm.hook.compute_loss(components=components, batch=dict(batch), config=config, generator=generator,
                                 rows=Rows.from_generator(generator, len(batch["captions"])))
    finally:
        handle.remove()
    assert seen, f"compute_loss never called the denoiser '{denoiser}'"
    return seen


def test_example_plugin_in_the_docs_is_complete(tmp_path):
    """The docs' example plugin registers cleanly, trains, and the LoRA file it writes reloads
    through its own load_pipeline + load_lora to exactly the trained model: the reloaded
    denoiser gives the trained one's outputs on the same inputs, and differs from the base."""
    import torch
    from safetensors.torch import load_file

    from lorakit.testing import example_data, tiny_config
    from lorakit.tiny import make_tiny_model
    from lorakit.training import Trainer

    plugins.register("docs-example", _example_plugin())
    try:
        pm = plugins.get_plugin_manager("docs-example")
        plugins.require_hooks(pm, "docs-example")
        info = pm.hook.arch_info()
        denoiser = info.denoiser

        model = make_tiny_model("docs-example", tmp_path / "model")
        # alpha != rank: a file without the adapter metadata would reload at the wrong scale
        config = tiny_config("docs-example", model, example_data(), tmp_path / "out", max_steps=2, rank=4, alpha=8)
        trainer = Trainer(config).setup()
        result = trainer.run()
        assert result.global_step == 2 and result.weights.is_file()
        assert len(load_file(str(result.weights))) > 0

        trained = trainer.components
        trained[denoiser].eval()
        batch = trainer.make_batch(0, list(range(min(2, len(trainer.dataset.examples)))))

        def with_denoiser(pipeline):
            module = getattr(pipeline, denoiser, None)
            assert isinstance(module, torch.nn.Module), f"the example's pipeline has no '{denoiser}' module"
            return {**trained, denoiser: module.to(torch.float32).eval()}

        reloaded = pm.hook.load_pipeline(model_path=model, device="cpu", dtype=torch.float32)
        pm.hook.load_lora(pipeline=reloaded, path=result.weights, adapter_name="docs")
        base = pm.hook.load_pipeline(model_path=model, device="cpu", dtype=torch.float32)

        want = _denoiser_outputs(pm, trained, denoiser, batch, trainer.config)
        got = _denoiser_outputs(pm, with_denoiser(reloaded), denoiser, batch, trainer.config)
        plain = _denoiser_outputs(pm, with_denoiser(base), denoiser, batch, trainer.config)
        assert len(want) == len(got) == len(plain)
        reload_diff = max(float((a - b).abs().max()) for a, b in zip(want, got))
        lora_effect = max(float((a - c).abs().max()) for a, c in zip(want, plain))
        assert reload_diff < 1e-5, f"the reloaded LoRA gives other outputs than the trained one (max diff {reload_diff})"
        assert lora_effect > 0, "the trained LoRA does not change the denoiser's output"
    finally:
        plugins.unregister("docs-example")


def test_core_names_no_architecture():
    """DESIGN rule 1: nothing under lorakit/ imports a plugin or names an architecture."""
    core = Path(hookspecs.__file__).parent
    pattern = re.compile(
        r"sdxl|sd1\.?5|sd15|kandinsky|wuerstchen|stable.?diffusion|lorakit_plugins|dreambooth|instance_prompt|"
        r"class_prompt|prior_loss|num_class_images", re.I
    )
    offenders = []
    for path in core.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if pattern.search(line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_without_the_dreambooth_entry_point_no_dreambooth_option_remains(monkeypatch):
    """Modes own their options: with the mode uninstalled, neither the CLI, nor TrainConfig, nor
    the resume check knows any DreamBooth option."""
    from lorakit import cli
    from lorakit.config import TrainConfig, resume_keys, run_options

    monkeypatch.setattr(plugins, "mode_entries", lambda: {})
    flags = {f for p in cli._train_parameters() for f in (getattr(p.default, "param_decls", None) or ())}
    names = {p.name for p in cli._train_parameters()}
    dreamy = re.compile(r"dreambooth|instance|class|prior|repeats", re.I)
    assert not [f for f in flags | names if dreamy.search(f)], sorted(flags | names)
    assert not [k for k in TrainConfig(arch="sd15").to_dict() if dreamy.search(k)]
    assert not [k for k in resume_keys(TrainConfig(arch="sd15")) if dreamy.search(k)]
    assert not [k for k in run_options("sd15") if dreamy.search(k)]
    with pytest.raises(LorakitError, match="unknown mode 'dreambooth'"):
        run_options("sd15", ["dreambooth"])


def test_every_package_of_the_checkout_is_installed():
    """pyproject lists packages explicitly (plugins/ installs as lorakit_plugins): a new package
    missing from the list would work in an editable install and vanish from a wheel."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("lorakit", "lorakit"), ("plugins", "lorakit_plugins")):
        for init in (root / top).rglob("__init__.py"):
            parts = init.parent.relative_to(root / top).parts
            found.add(".".join((name, *parts)))
    assert found == listed, f"pyproject packages differ: missing {sorted(found - listed)}, stale {sorted(listed - found)}"
