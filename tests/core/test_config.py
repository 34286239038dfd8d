"""plugins.toml: every problem is reported, one line each, with file, line, key path, expected and found."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import describe_type, load_config, parse_config
from core.errors import ConfigError
from tests.conftest import chatgate


def check_lines(config: Path, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    result = chatgate("check", "--config", str(config), env=env)
    assert "Traceback" not in result.stderr
    return result.returncode, result.stderr.splitlines()


def line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_default_config_is_valid_and_check_lists_what_it_enables():
    result = chatgate("check", "--config", "plugins.toml", cwd=Path(__file__).parents[2], check=True)
    assert result.stdout.splitlines() == [
        "plugins.toml: OK",
        "store:     sqlite",
        "providers: mock (mock), deepseek (deepseek)",
        "surfaces:  openai_compat, email_socket, topic_chat, anthropic_messages",
        "models:    mock-chat -> mock, mock-reasoner -> mock, mock-embedding -> mock, "
        "deepseek-chat -> deepseek, deepseek-reasoner -> deepseek",
    ]


def test_unknown_plugin_name(write_config):
    config = write_config('[providers.extra]\nplugin = "nosuch"\n')
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, 'nosuch')}: providers.extra.plugin: expected one of the installed "
        f'provider plugins ({installed_providers()}), found "nosuch"'
    ]


def installed_providers() -> str:
    from core.plugins import Plugins

    return ", ".join(sorted(Plugins.load().providers))


def test_wrong_type(write_config):
    config = write_config(replace={"\ntoken_delay = 0\n": '\ntoken_delay = "fast"\n'})
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, 'token_delay = ' + chr(34))}: providers.mock.token_delay: "
        'expected a number, found "fast" (a string)'
    ]


def test_missing_required_key(write_config):
    config = write_config("[models.orphan]\ninput_price = 1\n")
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, '[models.orphan]')}: models.orphan.provider: "
        "expected a string (required), found nothing"
    ]


def test_misspelled_key_suggests_the_right_one(write_config):
    config = write_config(replace={"first_token_delay": "first_tokn_delay"})
    status, lines = check_lines(config)
    assert status == 2
    assert len(lines) == 1
    assert lines[0].startswith(
        f"{config}:{line_of(config, 'first_tokn_delay')}: providers.mock.first_tokn_delay: "
    )
    assert 'did you mean "first_token_delay"?' in lines[0]
    assert lines[0].endswith('found unknown key "first_tokn_delay"')


def test_unset_environment_variable(write_config):
    config = write_config(replace={'path = "': 'path = "${CHATGATE_TEST_UNSET}/'})
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, 'CHATGATE_TEST_UNSET')}: store.path: "
        "expected environment variable CHATGATE_TEST_UNSET to be set, found it unset"
    ]


def test_environment_variables_are_substituted(write_config, tmp_path):
    config = write_config(replace={'path = "': 'path = "${CHATGATE_TEST_DIR}/${CHATGATE_TEST_NONE:-sub}/'})
    loaded = load_config(config, env={"CHATGATE_TEST_DIR": str(tmp_path)})
    assert loaded.store.options["path"].startswith(f"{tmp_path}/sub/")


def test_toml_syntax_error_names_its_line(write_config):
    config = write_config("[surfaces.broken\n")
    status, lines = check_lines(config)
    assert status == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"{config}:{line_of(config, '[surfaces.broken')}: expected valid TOML, found ")


def test_every_problem_is_reported_at_once_in_file_order(write_config):
    config = write_config(
        replace={
            "port": "port",
            'host = "127.0.0.1"': "hots = 1",
            "\ntoken_delay = 0\n": "\ntoken_delay = []\n",
        }
    )
    status, lines = check_lines(config)
    assert status == 2
    assert [line.split(": ")[1] for line in lines] == ["server.hots", "providers.mock.token_delay"]


def test_plugin_option_checks_across_fields_are_reported(write_config):
    config = write_config(replace={"max_output_tokens = 512": "max_output_tokens = 9000"})
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, '[models.mock-chat]')}: models.mock-chat: expected "
        "max_output_tokens to be > 0 and below context_tokens, found values that do not"
    ]


def test_model_must_name_a_configured_provider(write_config):
    config = write_config(
        replace={'[models.mock-reasoner]\nprovider = "mock"': '[models.mock-reasoner]\nprovider = "gone"'}
    )
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, 'gone')}: models.mock-reasoner.provider: "
        'expected one of the configured providers (mock), found "gone" (a string)'
    ]


def test_unknown_top_level_section(write_config):
    with pytest.raises(ConfigError) as caught:
        parse_config(write_config("[surface.topic_chat]\n").read_text(), "plugins.toml", {})
    assert 'did you mean "surfaces"?' in str(caught.value)


def test_missing_file_is_one_line(tmp_path):
    status, lines = check_lines(tmp_path / "absent.toml")
    assert status == 2
    assert lines == [
        f"{tmp_path / 'absent.toml'}: expected a configuration file "
        "(pass --config or set CHATGATE_CONFIG), found no such file"
    ]


def test_chatgate_config_environment_variable_is_the_default(write_config):
    config = write_config()
    result = chatgate("check", env={"CHATGATE_CONFIG": str(config)}, check=True)
    assert result.stdout.startswith(f"{config}: OK")


@pytest.mark.parametrize(
    ("tp", "text"),
    [
        (int, "an integer"),
        (float | None, "a number"),
        (list[str], "a list of strings"),
        (bool, "true or false"),
    ],
)
def test_types_read_as_english(tp, text):
    assert describe_type(tp) == text


def test_a_plugins_own_checks_are_configuration_problems(write_config):
    config = write_config(replace={'path = "': 'path = ":memory:"\n# "'})
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, '[store]')}: store: expected path to name a file all workers share "
        "(it is ':memory:'), found values that do not"
    ]


def test_an_unset_variable_in_a_typed_key_is_one_problem_not_two(write_config):
    config = write_config(replace={"\ntoken_delay = 0\n": '\ntoken_delay = "${CHATGATE_TEST_UNSET_DELAY}"\n'})
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, 'CHATGATE_TEST_UNSET_DELAY')}: providers.mock.token_delay: "
        "expected environment variable CHATGATE_TEST_UNSET_DELAY to be set, found it unset"
    ]


def test_literal_values_of_the_wrong_type_are_not_coerced(write_config):
    config = write_config(replace={"flush_interval = 0.05": 'flush_interval = "0.05"'})
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, 'flush_interval')}: generation.flush_interval: "
        'expected a number, found "0.05" (a string)'
    ]


def test_substituted_strings_are_converted_and_never_echoed(write_config):
    config = write_config(replace={"\ntoken_delay = 0\n": '\ntoken_delay = "${CHATGATE_TEST_DELAY}"\n'})
    assert check_lines(config, env={"CHATGATE_TEST_DELAY": "0.5"})[0] == 0
    status, lines = check_lines(config, env={"CHATGATE_TEST_DELAY": "sk-secret"})
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, 'CHATGATE_TEST_DELAY')}: providers.mock.token_delay: "
        "expected a number, found the value of ${CHATGATE_TEST_DELAY}"
    ]


def test_nested_type_errors_read_as_english(write_config):
    config = write_config(replace={'models = ["mock-chat", "mock-reasoner"]': 'models = ["mock-chat", 7]'})
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, 'models = [')}: providers.mock.models.1: "
        "expected a string, found 7 (an integer)"
    ]


def test_a_store_table_without_a_plugin(write_config):
    config = write_config(replace={'plugin = "sqlite"\n': ""})
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, '[store]')}: store.plugin: "
        "expected the name of an installed plugin (a string), found nothing"
    ]


def test_provider_names_differing_only_in_case_are_refused(write_config):
    config = write_config('[providers.MOCK]\nplugin = "mock"\n')
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{line_of(config, '[providers.MOCK]')}: providers.MOCK: "
        'expected a name that differs from "mock" in more than case, found "MOCK"'
    ]


def test_a_toml_error_at_the_end_of_the_file_names_the_last_line(write_config):
    config = write_config("x = [1\n")
    status, lines = check_lines(config)
    assert status == 2
    assert lines == [
        f"{config}:{len(config.read_text().splitlines())}: expected valid TOML, "
        "found Unclosed array (at end of document)"
    ]
