"""Entry-point plugins: a broken one stops the program with one located error, a good one registers."""

from __future__ import annotations

import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from compress_cli.errors import CompressError
from compress_cli.stages import registry
from compress_cli.stages.registry import ENTRY_POINT_GROUP, get_stage, list_stages

PLUGIN = "compress_test_plugin"


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Install fake entry points: ``plugins({"name": "module source"})`` writes each module under
    tmp_path and makes the registry load them on its next use (built-in stages stay registered)."""
    list_stages()  # the built-in stages, registered once for the process
    monkeypatch.syspath_prepend(str(tmp_path))
    registered_before = dict(registry._REGISTRY)
    names: list[str] = []

    def install(sources: dict[str, str]) -> None:
        eps = []
        for i, (name, source) in enumerate(sources.items()):
            module = f"{PLUGIN}_{i}"
            names.append(module)
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
            eps.append(EntryPoint(name=name, value=module, group=ENTRY_POINT_GROUP))
        monkeypatch.setattr(registry, "entry_points", lambda group: eps if group == ENTRY_POINT_GROUP else [])
        monkeypatch.setattr(registry, "_LOADED", False)

    yield install
    registry._REGISTRY.clear()
    registry._REGISTRY.update(registered_before)
    for module in names:
        sys.modules.pop(module, None)


GOOD = """
    from compress_cli.stages.base import Stage, StageConfig, StageResult
    from compress_cli.stages.registry import register_stage

    class NoopConfig(StageConfig):
        pass

    @register_stage("plugin_noop")
    class Noop(Stage[NoopConfig]):
        def run(self, state):
            return StageResult()
"""


def test_a_plugin_registers_its_stage(plugins):
    plugins({"noop": GOOD})
    assert "plugin_noop" in list_stages() and "finetune" in list_stages()
    assert get_stage("plugin_noop").__module__ == f"{PLUGIN}_0"
    assert registry._LOADED


def test_a_plugin_that_fails_to_import_is_one_located_error(plugins):
    plugins({"noop": GOOD, "broken": "import not_a_module_anywhere_xyz\n"})
    with pytest.raises(CompressError) as e:
        list_stages()
    assert e.value.problems == [
        f"stage plugin 'broken' = '{PLUGIN}_1' in entry-point group 'compress_cli.stages' failed to load: "
        "ModuleNotFoundError: No module named 'not_a_module_anywhere_xyz'"
    ]
    assert isinstance(e.value.__cause__, ModuleNotFoundError)  # --debug shows where
    assert not registry._LOADED  # not a half-filled registry that later calls take as complete
    with pytest.raises(CompressError, match="stage plugin 'broken'"):
        get_stage("finetune")  # every later use says so again


def test_a_plugin_that_takes_a_builtin_name_is_one_located_error(plugins):
    plugins({"dup": GOOD.replace('"plugin_noop"', '"finetune"')})
    with pytest.raises(
        CompressError,
        match=r"stage plugin 'dup' = .* failed to load: ValueError: stage "
        r"'finetune' is already registered by compress_cli\.stages\.finetune",
    ):
        list_stages()
    assert registry._REGISTRY["finetune"].__module__ == "compress_cli.stages.finetune"
