"""docs/plugins.md against the code (in the style of datasette's documentation tests): every hook and
every public member of the plugin API is in the guide with its exact signature, and every hook and
public method is exercised by a test named in TESTED_BY."""

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from openrlhf_hooks import api, hookspecs

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "plugins.md").read_text()
CLASSES = [api.LossPlugin, api.RankLoss, api.RolloutProcessor]
HOOKS = [name for name, value in vars(hookspecs).items() if callable(value) and hasattr(value, "openrlhf_hooks_spec")]


def written(function) -> str:
    """A signature as the guide writes it: annotations as in the source, no quotes."""
    signature = inspect.signature(function)
    parts, keyword_only = [], False
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        text = parameter.name
        if parameter.annotation is not parameter.empty:
            text += f": {parameter.annotation}"
        if parameter.default is not parameter.empty:
            text += f" = {parameter.default!r}"
        parts.append(text)
    returns = "" if signature.return_annotation is signature.empty else f" -> {signature.return_annotation}"
    return f"{function.__name__}({', '.join(parts)}){returns}"


def public_methods(cls):
    return [value for name, value in vars(cls).items() if inspect.isfunction(value) and not name.startswith("_")]


def test_hooks_are_found():
    assert HOOKS == ["register_loss_plugins", "register_rollout_processors"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook):
    assert f"`{written(getattr(hookspecs, hook))}`" in GUIDE


# Each hook and public method of the plugin API -> the tests that exercise it, as "file::function".
# A test is named here only when it fails if the member is not called or misbehaves (the note says how).
TESTED_BY = {
    # EPO's and the test plugin's registrations are found; a wrong registration is refused
    "register_loss_plugins": ["tests/test_plugins.py::test_epo_and_third_party_are_found_through_entry_points",
                              "tests/test_plugins.py::test_registering_something_that_is_not_a_plugin"],
    # turn_stats is registered; the trace names the hook's calls
    "register_rollout_processors": ["tests/test_plugins.py::test_epo_and_third_party_are_found_through_entry_points",
                                    "tests/test_plugins.py::test_trace_switch_prints_every_hook_call_through_pluggys_monitoring"],
    # the plugin flags are in --help and parsed
    "LossPlugin.add_arguments": ["tests/test_launcher.py::test_help_shows_plugin_and_host_flags",
                                 "tests/test_launcher.py::test_overrides_and_config_file"],
    # the dry run's config is the resolved one; bad values are one-line errors
    "LossPlugin.resolve_config": ["tests/test_launcher.py::test_third_party_plugin_is_selected_through_its_entry_point",
                                  "tests/test_launcher.py::test_bad_input_is_a_one_line_error_naming_the_flag"],
    # a contradicting host flag is refused before Ray
    "LossPlugin.check_host": ["tests/test_plugin_check.py::test_example_plugin_refuses_a_second_entropy_bonus",
                              "tests/test_launcher.py::test_bad_input_is_a_one_line_error_naming_the_flag"],
    # the dry run's "host" is the plugin's summary
    "LossPlugin.host_summary": ["tests/test_launcher.py::test_third_party_plugin_is_selected_through_its_entry_point",
                                "tests/test_plugin_check.py::test_example_plugin_passes_the_dry_run"],
    # the launcher's dry run carries the plugin's report and prints its warnings (EPO's corridor)
    "LossPlugin.report": ["tests/test_corridor_holds.py::test_dry_run_has_the_corridor_field_and_the_warning",
                          "tests/test_corridor_holds.py::test_the_plugin_reports_the_corridor_and_warns_when_it_does_not_hold"],
    "LossPlugin.start_up_warnings": ["tests/test_corridor_holds.py::test_dry_run_has_the_corridor_field_and_the_warning",
                                     "tests/test_corridor_holds.py::test_the_plugin_reports_the_corridor_and_warns_when_it_does_not_hold"],
    # the rank loss is built inside the rank's worker process, and trains there
    "LossPlugin.build_rank_loss": ["tests/test_ray_actor.py::test_rank_actor_reports_epo_active_in_its_worker_process",
                                   "tests/test_e2e_cpu.py::test_host_alone_and_third_party_plugin"],
    # the host's real ppo_train between the hook layer's begin_step and end_step: EPO's per-step metrics
    # and gradients; in the whole loop, the test plugin's per-micro-batch calls reported by end_step
    "RankLoss.begin_step": ["tests/test_openrlhf_deepspeed.py::test_loss_and_gradients_equal_one_process",
                            "tests/test_e2e_cpu.py::test_grpo_example_two_ranks_zero2_then_resume"],
    "RankLoss.policy_loss": ["tests/test_openrlhf_deepspeed.py::test_loss_and_gradients_equal_one_process",
                             "tests/test_e2e_cpu.py::test_host_alone_and_third_party_plugin"],
    "RankLoss.end_step": ["tests/test_openrlhf_deepspeed.py::test_loss_and_gradients_equal_one_process",
                          "tests/test_e2e_cpu.py::test_host_alone_and_third_party_plugin"],
    # each optimizer step linearized at its own entropy, through the host's split into micro-batches
    "RankLoss.needs_optimizer_step_entropy": ["tests/test_grad_accum.py::test_every_optimizer_step_of_an_rl_step_is_exact",
                                              "tests/test_grad_accum.py::test_gradient_and_metrics_do_not_depend_on_the_split"],
    "RankLoss.begin_optimizer_step": ["tests/test_grad_accum.py::test_every_optimizer_step_of_an_rl_step_is_exact",
                                      "tests/test_grad_accum.py::test_gradient_and_metrics_do_not_depend_on_the_split"],
    # through the host's save_ckpt/load_ckpt, and a resumed run of the whole loop
    "RankLoss.state_dict": ["tests/test_openrlhf_deepspeed.py::test_checkpoint_round_trip_through_host_save_and_load",
                            "tests/test_e2e_cpu.py::test_grpo_example_two_ranks_zero2_then_resume"],
    "RankLoss.load_state_dict": ["tests/test_openrlhf_deepspeed.py::test_checkpoint_round_trip_through_host_save_and_load",
                                 "tests/test_e2e_cpu.py::test_grpo_example_two_ranks_zero2_then_resume"],
    # turn_stats' info["turns"] reaches the host's TensorBoard logs in the whole loop
    "RolloutProcessor.process": ["tests/test_e2e_cpu.py::test_grpo_example_two_ranks_zero2_then_resume"],
}  # fmt: skip
MEMBERS = HOOKS + [m.__qualname__ for cls in CLASSES for m in public_methods(cls)]


def collected_tests(path: Path) -> set:
    """The test functions pytest collects from a test file: its module-level `def test_*` (read with
    ast, by name, not by searching the text)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def missing_tests(tested_by: dict, members: list) -> list:
    """What is wrong with a member -> tests table: members without tests, entries for no member, and
    named tests that do not exist (in a file under tests/ or hooks/tests/, as a collected test function)."""
    problems = [f"{member}: no test named" for member in members if not tested_by.get(member)]
    problems += [f"{member}: not a hook or public method of the plugin API" for member in tested_by if member not in members]
    for member, tests in tested_by.items():
        for test in tests:
            file, _, function = test.partition("::")
            path = ROOT / file
            if not (file.startswith(("tests/", "hooks/tests/")) and path.name.startswith("test_") and path.is_file()):
                problems.append(f"{member}: {file} is not a test file")
            elif function not in collected_tests(path):
                problems.append(f"{member}: {file} has no test function {function}")
    return problems


@pytest.mark.parametrize("member", MEMBERS)
def test_every_hook_and_public_method_has_a_named_test(member):
    problems = missing_tests({member: TESTED_BY.get(member, [])}, [member])
    assert not problems, problems


def test_the_test_table_names_only_api_members():
    assert not [problem for problem in missing_tests(TESTED_BY, MEMBERS) if "not a hook or public method" in problem]


def test_the_table_check_finds_what_is_missing():
    # a renamed test, a file that is not a test file, a member left out, and a stale entry are each caught
    table = {"register_loss_plugins": ["tests/test_plugins.py::test_no_such_test"],
             "register_rollout_processors": ["tests/support/fake_plugins.py::install_fake_plugin"],
             "RankLoss.gone": ["tests/test_plugins.py::test_env_selects_plugins"]}  # fmt: skip
    assert sorted(missing_tests(table, ["register_loss_plugins", "register_rollout_processors", "RolloutProcessor.process"])) == [
        "RankLoss.gone: not a hook or public method of the plugin API",
        "RolloutProcessor.process: no test named",
        "register_loss_plugins: tests/test_plugins.py has no test function test_no_such_test",
        "register_rollout_processors: tests/support/fake_plugins.py is not a test file",
    ]
    # a name that only appears in a test file's text (a comment, a string) is not a test function
    assert "test_the_table_check_finds_what_is_missing" in collected_tests(Path(__file__))
    assert "test_no_such_test" not in collected_tests(Path(__file__))


@pytest.mark.parametrize("method", [m for cls in CLASSES for m in public_methods(cls)], ids=lambda m: m.__qualname__)
def test_every_public_method_is_documented_with_its_signature(method):
    assert f"`{written(method)}`" in GUIDE, written(method)


CLASS_ATTRIBUTES = sorted(
    {name for cls in CLASSES for name, value in vars(cls).items() if not name.startswith("_") and not callable(value)}
)


def test_class_attributes_are_found():
    assert {"name", "version", "needs_entropy", "check_every", "total_steps_knob"} <= set(CLASS_ATTRIBUTES)


@pytest.mark.parametrize("name", CLASS_ATTRIBUTES)
def test_class_attributes_are_documented(name):
    assert f"| `{name}` |" in GUIDE


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(api.RankContext)])
def test_every_rank_context_field_is_documented(field):
    assert f"| `{field}` |" in GUIDE


def test_the_signature_writer_reads_what_it_must():
    assert written(api.RankLoss.begin_step) == "begin_step(self) -> None"
    assert "*, action_mask: torch.Tensor" in written(api.RankLoss.policy_loss)
