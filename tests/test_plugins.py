"""The plugin manager: entry-point discovery, OPENRLHF_HOOKS_PLUGINS, and loud errors.

Broken or conflicting plugins are real installed distributions (tests/support/fake_plugins.py).
"""

import pytest

from fake_plugins import install_fake_plugin
from openrlhf_hooks import LossPlugin, PluginError, RolloutProcessor, load_plugins
from openrlhf_hooks.plugins import ENV_PLUGINS


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Discovery itself: the suite's selection (tests/conftest.py) is removed, so every installed
    entry point loads, which may include plugins installed beside this project: assert only on
    the suite's own plugins and on those installed here."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ENV_PLUGINS, raising=False)
    return tmp_path


EXTRA = """
    from openrlhf_hooks import LossPlugin, hookimpl

    class Extra(LossPlugin):
        name, version = "extra", "0.1"

    @hookimpl
    def register_loss_plugins(register):
        register(Extra())
"""


def test_epo_and_third_party_are_found_through_entry_points(site):
    registry = load_plugins()
    assert {"epo", "scaled"} <= set(registry.loss_plugins)
    assert isinstance(registry.loss_plugin("epo"), LossPlugin)
    assert isinstance(registry.rollout_processor("turn_stats"), RolloutProcessor)
    assert registry.sources["loss:epo"] == "epo" and registry.sources["loss:scaled"] == "scaled"


def test_env_selects_plugins(site, monkeypatch):
    monkeypatch.setenv(ENV_PLUGINS, "")
    assert load_plugins().loss_plugins == {}
    monkeypatch.setenv(ENV_PLUGINS, "epo")
    assert set(load_plugins().loss_plugins) == {"epo"}
    monkeypatch.setenv(ENV_PLUGINS, "epo, nope")
    with pytest.raises(PluginError, match=r"OPENRLHF_HOOKS_PLUGINS names 'nope', which no installed package provides"):
        load_plugins()


def test_plugin_failing_to_import_names_it_and_its_entry_point(site):
    install_fake_plugin(site, "brokenplug", {"broken": "broken_module"}, {"broken_module": "import no_such_module\n"})
    with pytest.raises(PluginError) as err:
        load_plugins()
    message = str(err.value)
    assert "plugin 'broken'" in message and "broken = broken_module" in message and "no_such_module" in message


def test_requested_missing_module_is_an_error(site, monkeypatch):
    install_fake_plugin(site, "ghostplug", {"ghost": "ghost_module_not_there"}, {})
    monkeypatch.setenv(ENV_PLUGINS, "ghost")
    with pytest.raises(PluginError, match="plugin 'ghost' .*ghost_module_not_there.*failed to import"):
        load_plugins()


def test_misspelled_hook_is_an_error(site):
    install_fake_plugin(
        site,
        "typoplug",
        {"typo": "typo_module"},
        {
            "typo_module": """
                from openrlhf_hooks import hookimpl

                @hookimpl
                def register_loss_plugin(register):  # missing the final s
                    pass
            """
        },
    )
    with pytest.raises(PluginError, match="register_loss_plugin.*does not exist|does not exist.*register_loss_plugin"):
        load_plugins()


def test_two_plugins_claiming_one_name(site):
    install_fake_plugin(
        site,
        "impostor",
        {"impostor": "impostor_module"},
        {
            "impostor_module": """
                from openrlhf_hooks import LossPlugin, hookimpl

                class Impostor(LossPlugin):
                    name = "epo"

                @hookimpl
                def register_loss_plugins(register):
                    register(Impostor())
            """
        },
    )
    with pytest.raises(PluginError, match=r"two plugins claim the loss name 'epo': '(epo|impostor)' and '(epo|impostor)'"):
        load_plugins()


def test_two_distributions_claiming_one_entry_point_name(site):
    install_fake_plugin(site, "otherepo", {"epo": "other_epo_module"}, {"other_epo_module": ""})
    with pytest.raises(PluginError, match="two installed plugins claim the entry point name 'epo'"):
        load_plugins()


def test_registering_something_that_is_not_a_plugin(site):
    install_fake_plugin(
        site,
        "wrongplug",
        {"wrong": "wrong_module"},
        {
            "wrong_module": """
                from openrlhf_hooks import hookimpl

                @hookimpl
                def register_loss_plugins(register):
                    register(object())
            """
        },
    )
    with pytest.raises(PluginError, match="plugin 'wrong' registered .* which is not a LossPlugin"):
        load_plugins()


def test_unknown_loss_plugin_names_the_loaded_ones(site, monkeypatch):
    # the message lists the loss plugins this process loaded: here the selection, not an extra
    # plugin that is installed but left out of it
    install_fake_plugin(site, "extraplug", {"extra": "extra_module"}, {"extra_module": EXTRA})
    monkeypatch.setenv(ENV_PLUGINS, "epo,scaled")
    with pytest.raises(PluginError, match=r"unknown loss plugin 'ep0'; installed loss plugins: epo, scaled$"):
        load_plugins().loss_plugin("ep0")
    monkeypatch.setenv(ENV_PLUGINS, "extra,scaled")
    with pytest.raises(PluginError, match=r"unknown loss plugin 'ep0'; installed loss plugins: extra, scaled$"):
        load_plugins().loss_plugin("ep0")


def test_worker_env_names_exactly_what_this_process_loaded(site, monkeypatch):
    from openrlhf_hooks.plugins import worker_env

    install_fake_plugin(site, "extraplug", {"extra": "extra_module"}, {"extra_module": EXTRA})
    environ = {"OPENRLHF_HOOKS_TRACE": "1", "OPENRLHF_EPO_KERNEL": "torch", "OPENRLHF_SCALED_X": "2",
               "OPENRLHF_OTHER_Y": "3", "HOME": "/root"}  # fmt: skip
    # unset: every installed entry point, in name order (whatever else this environment holds), and
    # the workers are told that list by name
    everything = load_plugins()
    assert {"epo", "extra", "scaled"} <= set(everything.selected) and list(everything.selected) == sorted(everything.selected)
    assert worker_env(everything, environ)[ENV_PLUGINS] == ",".join(everything.selected)
    monkeypatch.setenv(ENV_PLUGINS, "epo,scaled")
    registry = load_plugins()
    assert registry.selected == ("epo", "scaled")
    assert worker_env(registry, environ) == {
        ENV_PLUGINS: "epo,scaled",  # a worker loads these, whatever its own node's environment says
        "OPENRLHF_HOOKS_TRACE": "1",
        "OPENRLHF_EPO_KERNEL": "torch",  # a loaded loss plugin's own settings travel too
        "OPENRLHF_SCALED_X": "2",
    }
    monkeypatch.setenv(ENV_PLUGINS, "scaled")
    assert worker_env(load_plugins(), environ)[ENV_PLUGINS] == "scaled"
    assert "OPENRLHF_EPO_KERNEL" not in worker_env(load_plugins(), environ)


def test_k_comes_from_the_launcher_and_epo_applies_its_own_override():
    # the hook layer hands every plugin the launcher's count (or None and why); --epo.total_steps wins
    from openrlhf_epo import EPOConfig
    from openrlhf_hooks import PluginConfigError, RankContext

    plugin = load_plugins().loss_plugin("epo")

    def k(config_steps, counted, note=""):
        context = RankContext(rank=0, dp_size=1, total_steps=counted, all_reduce_sum=lambda t: t, total_steps_note=note)
        config = EPOConfig.from_preset("seed", total_steps=config_steps).to_dict()
        return plugin.build_rank_loss(None, config, context).context.total_steps

    assert k(None, 12) == 12
    assert k(7, 12) == 7 and k(7, None) == 7
    with pytest.raises(PluginConfigError, match=r"needs the run's total RL steps and they are unknown \(no prompts\); set --epo.total_steps"):
        k(None, None, "no prompts")


def test_trace_switch_prints_every_hook_call_through_pluggys_monitoring(monkeypatch, capsys):
    monkeypatch.setenv(ENV_PLUGINS, "epo,scaled")  # the suite's selection, named: the lines below list its plugins
    monkeypatch.setenv("OPENRLHF_HOOKS_TRACE", "1")
    registry = load_plugins()
    lines = [line.split("]: ", 1)[1] for line in capsys.readouterr().err.splitlines() if line.startswith("openrlhf_hooks trace")]
    assert lines == [
        "register_loss_plugins(register) -> epo", "register_loss_plugins done",
        "register_rollout_processors(register) -> epo", "register_rollout_processors done",
        "register_loss_plugins(register) -> scaled", "register_loss_plugins done",
    ]  # fmt: skip
    assert registry.sources == {"loss:epo": "epo", "rollout processor:turn_stats": "epo", "loss:scaled": "scaled"}
    monkeypatch.delenv("OPENRLHF_HOOKS_TRACE")
    load_plugins()
    assert "openrlhf_hooks trace" not in capsys.readouterr().err
