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
    for name in hookspecs.REQUIRED_TRAIN_HOOKS:
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
    text = DOCS.read_text()
    for name in _spec_names():
        spec = getattr(hookspecs, name)
        args = spec.__code__.co_varnames[: spec.__code__.co_argcount]
        assert re.search(rf"^#+ `?{name}\(", text, re.M), f"docs/plugins.md has no section for {name}"
        assert f"{name}({', '.join(args)})" in text, f"docs/plugins.md shows a different signature for {name}"


def test_every_hook_is_called_by_lorakit():
    """A hook nobody calls is dead contract: each must be called somewhere in lorakit/."""
    source = "\n".join(p.read_text() for p in Path(hookspecs.__file__).parent.glob("*.py") if p.name != "hookspecs.py")
    for name in _spec_names():
        assert f"hook.{name}(" in source or f'"{name}"' in source, f"lorakit never calls hook {name}"


def test_example_plugin_in_the_docs_is_complete(tmp_path):
    """The docs' example plugin registers cleanly and implements every required hook."""
    text = DOCS.read_text()
    match = re.search(r"```python\n(# my_arch\.py.*?)```", text, re.S)
    assert match, "docs/plugins.md lost its complete example plugin"
    module = types.ModuleType("my_arch")
    exec(compile(match.group(1), "my_arch.py", "exec"), module.__dict__)
    plugins.register("docs-example", module)
    try:
        pm = plugins.get_plugin_manager("docs-example")
        plugins.require_hooks(pm, "docs-example")
        assert pm.hook.arch_info().denoiser == "unet"

        from safetensors.torch import load_file

        from lorakit.testing import example_data, tiny_config
        from lorakit.tiny import make_tiny_model
        from lorakit.training import Trainer

        model = make_tiny_model("docs-example", tmp_path / "model")
        trainer = Trainer(tiny_config("docs-example", model, example_data(), tmp_path / "out", max_steps=2)).setup()
        result = trainer.run()
        saved = load_file(str(result.weights))
        trained = {f"unet.{k}": v for k, v in trainer.lora_layers()["unet"][0].items()}
        assert saved.keys() == trained.keys() and len(saved) > 0
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
