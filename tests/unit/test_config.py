"""The config loader: precedence, validation, env parsing, path rules, masking, and `fmnist config`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fmnist import config
from fmnist.cli import app
from fmnist.errors import ConfigError

SOURCE_ROOT = Path(config.__file__).resolve().parent.parent
DEFAULT_YAML = SOURCE_ROOT / "configs" / "default.yaml"

pytestmark = pytest.mark.usefixtures("clean_env")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- precedence -----------------------------------------------------------------------------


def test_each_layer_overrides_the_one_below(fmnist_home: Path, tmp_path: Path) -> None:
    assert config.load(env={}).train.epochs == config.TrainConfig().epochs == 24
    write(fmnist_home / "configs" / "default.yaml", "train:\n  epochs: 31\n")
    assert config.load(env={}).train.epochs == 31
    user = write(tmp_path / "user.yaml", "train:\n  epochs: 32\n")
    assert config.load(user, env={}).train.epochs == 32
    env = {"FMNIST_TRAIN__EPOCHS": "33"}
    assert config.load(user, env=env).train.epochs == 33
    assert config.load(user, flags={"train.epochs": 34}, env=env).train.epochs == 34


def test_a_flag_left_as_none_lets_the_lower_layer_show(fmnist_home: Path) -> None:
    cfg = config.load(flags={"train.epochs": None}, env={"FMNIST_TRAIN__EPOCHS": "23"})
    assert cfg.train.epochs == 23


def test_layers_merge_key_by_key_not_section_by_section(fmnist_home: Path, tmp_path: Path) -> None:
    write(fmnist_home / "configs" / "default.yaml", "train:\n  epochs: 21\n  batch_size: 64\n")
    user = write(tmp_path / "user.yaml", "train:\n  epochs: 22\n")
    cfg = config.load(user, env={"FMNIST_TRAIN__SEED": "7"})
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.seed) == (22, 64, 7)
    assert cfg.train.learning_rate == config.TrainConfig().learning_rate


def test_env_defaults_to_the_process_environment(fmnist_home: Path,
                                                 clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FMNIST_SERVE__MAX_BATCH_SIZE", "17")
    assert config.load().serve.max_batch_size == 17
    assert config.load(env={}).serve.max_batch_size == 256  # an explicit env replaces os.environ


def test_use_default_file_false_skips_default_yaml(fmnist_home: Path) -> None:
    write(fmnist_home / "configs" / "default.yaml", "train:\n  epochs: 21\n")
    assert config.load(env={}, use_default_file=False).train.epochs == 24


def test_fmnist_variables_without_a_section_are_not_config(fmnist_home: Path) -> None:
    env = {"FMNIST_STATE": "/somewhere", "FMNIST_HOME": "/elsewhere", "PATH": "/bin"}
    assert config.load(env=env) == config.load(env={})


def test_train_full_profile_layers_over_the_defaults(clean_env: pytest.MonkeyPatch) -> None:
    cfg = config.load(SOURCE_ROOT / "configs" / "train-full.yaml", env={})
    assert (cfg.model.name, cfg.model.convs_per_stage, cfg.train.epochs) == ("fmnist-full", 2, 24)
    assert cfg.train.batch_size == 128
    assert cfg.weights_path == SOURCE_ROOT / "weights" / "fmnist-full.keras"
    assert cfg.train.teacher is None  # the teacher of the default profile learns from labels


def test_default_profile_distils_from_the_shipped_full_model(clean_env: pytest.MonkeyPatch) -> None:
    cfg = config.load(env={})
    assert cfg.train.teacher == SOURCE_ROOT / "weights" / "fmnist-full.keras"
    assert cfg.train.teacher.is_file()
    assert config.load(env={"FMNIST_TRAIN__TEACHER": ""}).train.teacher is None


# --- errors name their source --------------------------------------------------------------


@pytest.mark.parametrize(("text", "fragments"), [
    ("nope:\n  x: 1\n", ["unknown section `nope`", "Known sections: data, model"]),
    ("train:\n  epoch: 3\n", ["unknown key `train.epoch`", "epochs"]),
    ("train:\n  epochs: many\n", ["`train.epochs` must be a whole number", "'many'"]),
    ("train:\n  epochs: 2.5\n", ["`train.epochs` must be a whole number"]),
    ("train:\n  epochs: true\n", ["`train.epochs` must be a whole number"]),
    ("train:\n  augment: 1\n", ["`train.augment` must be true or false"]),
    ("train:\n  learning_rate: fast\n", ["`train.learning_rate` must be a number"]),
    ("model:\n  filters: 32\n", ["`model.filters` must be a list"]),
    ("model:\n  filters: [32, big]\n", ["`model.filters` must be a whole number"]),
    ("model:\n  weights_dir: 5\n", ["`model.weights_dir` must be a path"]),
    ("kafka:\n  client_id: [a]\n", ["`kafka.client_id` must be a string"]),
    ("train: 5\n", ["section `train` must be a mapping"]),
    ("- train\n", ["top level must be a mapping"]),
])
def test_bad_file_is_a_config_error_naming_the_file(fmnist_home: Path, tmp_path: Path, text: str,
                                                   fragments: list[str]) -> None:
    user = write(tmp_path / "user.yaml", text)
    with pytest.raises(ConfigError) as info:
        config.load(user, env={})
    assert str(user) in info.value.message
    for fragment in fragments:
        assert fragment in str(info.value)
    assert info.value.exit_code == 2


def test_bad_default_yaml_names_default_yaml(fmnist_home: Path) -> None:
    default = write(fmnist_home / "configs" / "default.yaml", "serve:\n  brokr: kafka\n")
    with pytest.raises(ConfigError, match="unknown key `serve.brokr`") as info:
        config.load(env={})
    assert str(default) in info.value.message


def test_missing_config_file(fmnist_home: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        config.load(tmp_path / "absent.yaml", env={})
    assert str(tmp_path / "absent.yaml") in info.value.message


def test_invalid_yaml_names_the_file(fmnist_home: Path, tmp_path: Path) -> None:
    user = write(tmp_path / "user.yaml", "train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as info:
        config.load(user, env={})
    assert str(user) in info.value.message


def test_empty_file_and_empty_section_are_no_op_layers(fmnist_home: Path, tmp_path: Path) -> None:
    assert config.load(write(tmp_path / "a.yaml", ""), env={}) == config.load(env={})
    commented = write(tmp_path / "b.yaml", "train:\n  # epochs: 3\nmodel:\n  top_k: 5\n")
    cfg = config.load(commented, env={})
    assert (cfg.train.epochs, cfg.model.top_k) == (24, 5)


@pytest.mark.parametrize(("name", "value", "fragment"), [
    ("FMNIST_NOPE__X", "1", "unknown section `nope`"),
    ("FMNIST_TRAIN__EPOCH", "1", "unknown key `train.epoch`"),
    ("FMNIST_TRAIN__EPOCHS", "abc", "`train.epochs` must be a whole number, got 'abc'"),
    ("FMNIST_TRAIN__EPOCHS", "2.5", "`train.epochs` must be a whole number"),
    ("FMNIST_TRAIN__EPOCHS", "", "`train.epochs` must be a whole number"),
    ("FMNIST_TRAIN__AUGMENT", "maybe", "`train.augment` must be true or false"),
    ("FMNIST_TRAIN__LEARNING_RATE", "fast", "`train.learning_rate` must be a number"),
    ("FMNIST_MODEL__FILTERS", "16,x", "`model.filters` must be a whole number"),
    ("FMNIST_MODEL__WEIGHTS_DIR", "", "`model.weights_dir` must be a path"),
])
def test_bad_env_var_is_a_config_error_naming_the_variable(fmnist_home: Path, name: str,
                                                          value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(env={name: value})
    assert f"environment variable {name}" in info.value.message
    assert fragment in info.value.message


@pytest.mark.parametrize(("flags", "fragment"), [
    ({"train.epochs": "many"}, "`train.epochs` must be a whole number"),
    ({"train.epoch": 3}, "unknown key `train.epoch`"),
    ({"nope.x": 3}, "unknown section `nope`"),
])
def test_bad_flag_is_a_config_error_naming_the_option(fmnist_home: Path, flags: dict[str, object],
                                                     fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(flags=flags, env={})
    assert f"command-line option for {next(iter(flags))}" in info.value.message
    assert fragment in info.value.message


# --- env parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text", "section", "key", "expected"), [
    ("FMNIST_TRAIN__EPOCHS", "7", "train", "epochs", 7),
    ("FMNIST_TRAIN__EPOCHS", " 7 ", "train", "epochs", 7),
    ("FMNIST_TRAIN__LEARNING_RATE", "1e-3", "train", "learning_rate", 0.001),
    ("FMNIST_SERVE__MAX_WAIT_MS", "5", "serve", "max_wait_ms", 5.0),
    ("FMNIST_TRAIN__AUGMENT", "false", "train", "augment", False),
    ("FMNIST_TRAIN__AUGMENT", "0", "train", "augment", False),
    ("FMNIST_TRAIN__AUGMENT", "No", "train", "augment", False),
    ("FMNIST_TRAIN__AUGMENT", "off", "train", "augment", False),
    ("FMNIST_BROKER__CREATE_TOPICS", "TRUE", "broker", "create_topics", True),
    ("FMNIST_BROKER__CREATE_TOPICS", "1", "broker", "create_topics", True),
    ("FMNIST_BROKER__CREATE_TOPICS", "yes", "broker", "create_topics", True),
    ("FMNIST_BROKER__CREATE_TOPICS", "on", "broker", "create_topics", True),
    ("FMNIST_MODEL__FILTERS", "16, 32,64", "model", "filters", (16, 32, 64)),
    ("FMNIST_MODEL__FILTERS", "8", "model", "filters", (8,)),
    ("FMNIST_IMAGING__ALLOWED_FORMATS", "PNG,JPEG", "imaging", "allowed_formats",
     ("PNG", "JPEG")),
    ("FMNIST_KAFKA__CLIENT_ID", "7", "kafka", "client_id", "7"),
    ("FMNIST_KAFKA__SASL_MECHANISM", "", "kafka", "sasl_mechanism", ""),
    ("FMNIST_DATA__DATA_DIR", "", "data", "data_dir", None),
    ("FMNIST_DATA__DATA_DIR", "/srv/fashion", "data", "data_dir", Path("/srv/fashion")),
])
def test_env_text_is_parsed_to_the_declared_type(fmnist_home: Path, name: str, text: str,
                                                 section: str, key: str, expected: object) -> None:
    value = getattr(getattr(config.load(env={name: text}), section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_yaml_scalars_are_coerced_to_the_declared_type(fmnist_home: Path, tmp_path: Path) -> None:
    user = write(tmp_path / "u.yaml", "kafka:\n  client_id: 7\nserve:\n  max_wait_ms: 3\n"
                                      "data:\n  data_dir: null\n")
    cfg = config.load(user, env={"FMNIST_DATA__DATA_DIR": "/x"})
    assert cfg.kafka.client_id == "7" and cfg.serve.max_wait_ms == 3.0
    assert isinstance(cfg.serve.max_wait_ms, float)
    assert cfg.data.data_dir == Path("/x")  # env over the file's null
    assert config.load(user, env={}).data.data_dir is None


def test_tilde_in_a_path_is_the_home_folder(fmnist_home: Path) -> None:
    cfg = config.load(env={"FMNIST_DATA__DATA_DIR": "~/fashion"})
    assert cfg.data.data_dir == Path.home() / "fashion"


# --- relative paths ------------------------------------------------------------------------


def test_typed_default_paths_are_relative_to_the_project_root(fmnist_home: Path) -> None:
    cfg = config.load(env={})
    assert cfg.model.weights_dir == fmnist_home.resolve() / "weights"
    assert cfg.weights_path == fmnist_home.resolve() / "weights" / "fmnist.keras"


def test_project_files_are_relative_to_the_project_root(fmnist_home: Path) -> None:
    write(fmnist_home / "configs" / "default.yaml", "model:\n  weights_dir: w1\n")
    assert config.load(env={}).model.weights_dir == fmnist_home.resolve() / "w1"
    profile = write(fmnist_home / "configs" / "profile.yaml", "data:\n  data_dir: d2\n")
    assert config.load(profile, env={}).data.data_dir == fmnist_home.resolve() / "d2"


def test_a_user_file_elsewhere_is_relative_to_its_own_folder(
        fmnist_home: Path, tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    user = write(tmp_path / "elsewhere" / "user.yaml", "model:\n  weights_dir: ../w\n"
                                                       "data:\n  data_dir: d\n")
    clean_env.chdir(fmnist_home)  # neither the cwd nor the root may leak in
    cfg = config.load(user, env={})
    assert cfg.model.weights_dir == tmp_path.resolve() / "w"
    assert cfg.data.data_dir == tmp_path.resolve() / "elsewhere" / "d"
    clean_env.chdir(tmp_path / "elsewhere")
    assert config.load("user.yaml", env={}).data.data_dir == tmp_path.resolve() / "elsewhere" / "d"


def test_env_and_flag_paths_are_relative_to_the_cwd(fmnist_home: Path, tmp_path: Path,
                                                    clean_env: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    clean_env.chdir(cwd)
    cfg = config.load(env={"FMNIST_MODEL__WEIGHTS_DIR": "w"}, flags={"data.data_dir": "d"})
    assert cfg.model.weights_dir == cwd.resolve() / "w"
    assert cfg.data.data_dir == cwd.resolve() / "d"


def test_absolute_paths_stay_as_given(fmnist_home: Path, tmp_path: Path) -> None:
    user = write(tmp_path / "u.yaml", f"model:\n  weights_dir: {tmp_path / 'abs'}\n")
    assert config.load(user, env={}).model.weights_dir == tmp_path / "abs"


def test_project_root_is_fmnist_home_or_the_source_tree(clean_env: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    assert config.project_root() == SOURCE_ROOT
    clean_env.setenv("FMNIST_HOME", str(tmp_path))
    assert config.project_root() == tmp_path.resolve()


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "bad", "fragment"), [
    ("serve.broker", "redis", "must be one of: `kafka`, `pubsub`"),
    ("serve.max_batch_size", 0, "must be at least 1"),
    ("serve.max_wait_ms", -1.0, "must be 0 or more"),
    ("serve.log_format", "xml", "must be `text` or `json`"),
    ("serve.metrics_port", 70000, "must be 0 (off) to 65535"),
    ("train.epochs", 0, "must be at least 1"),
    ("train.batch_size", 0, "must be at least 1"),
    ("train.validation_split", 1.0, "must be in [0, 1)"),
    ("train.limit", -1, "must be 0 (all) or more"),
    ("train.distill_weight", 1.5, "must be in [0, 1]"),
    ("train.distill_temperature", 0.0, "must be positive"),
    ("serve.backend", "torch", "must be `auto`, `jax` or `tensorflow`"),
    ("model.top_k", 11, "must be between 1 and 10"),
    ("model.top_k", 0, "must be between 1 and 10"),
    ("model.filters", (), "must list at least one stage"),
    ("model.filters", (32, 0), "must list at least one stage"),
    ("model.dropout", 1.0, "must be in [0, 1)"),
    ("imaging.invert", "sometimes", "must be `auto`, `always` or `never`"),
    ("imaging.max_payload_bytes", 0, "must be positive"),
    ("kafka.partitions", 0, "must be at least 1"),
    ("data.download_timeout_s", 0.0, "must be positive"),
])
def test_out_of_range_values_are_rejected_naming_key_value_and_source(
        fmnist_home: Path, key: str, bad: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(flags={key: bad}, env={})
    message = info.value.message
    assert f"{key} {fragment}" in message
    assert f"got {bad!r}" in message
    assert f"command-line option for {key}" in message


@pytest.mark.parametrize(("key", "good"), [
    ("serve.broker", "pubsub"), ("serve.max_wait_ms", 0.0), ("serve.log_format", "json"),
    ("train.validation_split", 0.0), ("model.top_k", 10), ("model.top_k", 1),
    ("imaging.invert", "never"), ("serve.metrics_port", 65535),
    ("train.distill_weight", 0.0), ("train.distill_weight", 1.0), ("serve.backend", "tensorflow"),
])
def test_boundary_values_are_accepted(fmnist_home: Path, key: str, good: object) -> None:
    section, _, name = key.partition(".")
    assert getattr(getattr(config.load(flags={key: good}, env={}), section), name) == good


def test_validation_names_the_env_variable_or_file_that_set_the_value(fmnist_home: Path,
                                                                      tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="from environment variable FMNIST_SERVE__BROKER"):
        config.load(env={"FMNIST_SERVE__BROKER": "rabbit"})
    user = write(tmp_path / "u.yaml", "serve:\n  broker: rabbit\n")
    with pytest.raises(ConfigError) as info:
        config.load(user, env={})
    assert f"from {user}" in info.value.message


def test_config_is_frozen(fmnist_home: Path) -> None:
    cfg = config.load(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]


# --- secrets and as_dict -------------------------------------------------------------------


def test_as_dict_masks_secrets_that_are_set(fmnist_home: Path) -> None:
    cfg = config.load(env={"FMNIST_KAFKA__SASL_PASSWORD": "hunter2",
                           "FMNIST_KAFKA__SASL_USERNAME": "alice"})
    masked = config.as_dict(cfg)
    assert masked["kafka"]["sasl_password"] == "***"
    assert masked["kafka"]["sasl_username"] == "alice"
    assert "hunter2" not in json.dumps(masked)
    assert config.as_dict(cfg, mask_secrets=False)["kafka"]["sasl_password"] == "hunter2"


def test_as_dict_leaves_an_unset_secret_empty(fmnist_home: Path) -> None:
    assert config.as_dict(config.load(env={}))["kafka"]["sasl_password"] == ""


def test_as_dict_is_plain_data(fmnist_home: Path) -> None:
    plain = config.as_dict(config.load(env={}))
    assert list(plain) == list(config.SECTIONS)
    assert plain["model"]["weights_dir"] == str(fmnist_home.resolve() / "weights")
    assert plain["model"]["filters"] == [32, 64, 128]
    assert plain["data"]["data_dir"] is None
    assert json.loads(json.dumps(plain)) == plain
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain


# --- configs/default.yaml agrees with the dataclasses --------------------------------------


def test_default_yaml_lists_every_key_of_every_section() -> None:
    listed = yaml.safe_load(DEFAULT_YAML.read_text())
    assert list(listed) == list(config.SECTIONS)
    for section, cls in config.SECTIONS.items():
        assert list(listed[section]) == [f.name for f in dataclasses.fields(cls)], section


def test_default_yaml_equals_the_typed_defaults(clean_env: pytest.MonkeyPatch) -> None:
    from_yaml = config.load(env={})
    typed = config.load(env={}, use_default_file=False)
    assert config.as_dict(from_yaml, mask_secrets=False) == config.as_dict(typed,
                                                                           mask_secrets=False)
    assert (typed.train.epochs, typed.train.weight_decay) == (24, 0.02)
    assert config.Config().imaging.max_pixels == 4096 * 4096


def test_default_yaml_is_commented() -> None:
    lines = DEFAULT_YAML.read_text().splitlines()
    assert lines[0].startswith("# fmnist default configuration")
    commented = [ln for ln in lines if ln.startswith("  ") and " # " in ln]
    assert len(commented) >= 35  # most keys explain themselves next to their default


# --- `fmnist config` -----------------------------------------------------------------------

runner = CliRunner()


def test_cli_config_prints_the_effective_config_as_yaml() -> None:
    # The real project root: its paths are short enough not to meet the wrapping bug below.
    result = runner.invoke(app, ["config"], env={"FMNIST_TRAIN__EPOCHS": "9"})
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["epochs"] == 9
    assert printed == config.as_dict(config.load(env={"FMNIST_TRAIN__EPOCHS": "9"}))


def test_cli_config_layers_a_config_file(fmnist_home: Path, tmp_path: Path) -> None:
    user = write(tmp_path / "u.yaml", "serve:\n  broker: pubsub\n")
    result = runner.invoke(app, ["config", "--config", str(user), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["serve"]["broker"] == "pubsub"


def test_cli_config_json_is_valid_json_with_secrets_masked(fmnist_home: Path) -> None:
    result = runner.invoke(app, ["config", "--json"],
                           env={"FMNIST_KAFKA__SASL_PASSWORD": "hunter2"})
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["kafka"]["sasl_password"] == "***"
    assert printed["train"]["epochs"] == 24
    assert "hunter2" not in result.output


def test_cli_config_bad_env_var_is_exit_2_naming_it_without_traceback(fmnist_home: Path) -> None:
    result = runner.invoke(app, ["config"], env={"FMNIST_TRAIN__EPOCHS": "lots"})
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    stderr = " ".join(result.stderr.split())  # rich wraps at the console width
    assert "environment variable FMNIST_TRAIN__EPOCHS" in stderr
    assert "must be a whole number, got 'lots'" in stderr
    assert result.stdout == ""
    assert "Traceback" not in result.output


def test_cli_config_out_of_range_value_is_exit_2(fmnist_home: Path) -> None:
    result = runner.invoke(app, ["config"], env={"FMNIST_SERVE__BROKER": "rabbit"})
    assert result.exit_code == 2
    assert "FMNIST_SERVE__BROKER" in result.stderr and "Traceback" not in result.output


def test_cli_config_yaml_survives_long_values(fmnist_home: Path) -> None:
    long_dir = "/srv/" + "x" * 120
    result = runner.invoke(app, ["config"], env={"FMNIST_DATA__DATA_DIR": long_dir})
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["data"]["data_dir"] == long_dir


def test_routing_settings_load_through_their_environment_variables(fmnist_home: Path) -> None:
    settings = config.routing("pubsub", "req-x", "res-x", "req-x.dlq", "workers-x")
    assert config.env_name("serve.max_batch_size") == "FMNIST_SERVE__MAX_BATCH_SIZE"
    cfg = config.load(env={config.env_name(k): v for k, v in settings.items()})
    assert (cfg.serve.broker, cfg.broker.request_topic, cfg.kafka.group_id) == (
        "pubsub", "req-x", "workers-x")
    assert cfg.pubsub.dlq_subscription == "req-x.dlq-sub"


# --- mappings: kafka.extra -----------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_google_variables(clean_env: pytest.MonkeyPatch) -> None:
    """Google's variables from the caller's shell would move pubsub.* under these tests."""
    for name, _ in config.GOOGLE_ENV:
        clean_env.delenv(name, raising=False)


def test_extra_from_yaml_keeps_dotted_names_and_writes_values_as_librdkafka_text(
        fmnist_home: Path, tmp_path: Path) -> None:
    user = write(tmp_path / "u.yaml", "kafka:\n  extra:\n    client.rack: eu-west-1a\n"
                 "    message.max.bytes: 2000\n    enable.ssl.certificate.verification: false\n")
    assert dict(config.load(user, env={}).kafka.extra) == {
        "client.rack": "eu-west-1a", "message.max.bytes": "2000",
        "enable.ssl.certificate.verification": "false"}


@pytest.mark.parametrize(("text", "expected"), [
    ("client.rack=eu-west-1a", {"client.rack": "eu-west-1a"}),
    (" client.rack = eu , sasl.oauthbearer.method=oidc ",
     {"client.rack": "eu", "sasl.oauthbearer.method": "oidc"}),
    ("sasl.oauthbearer.extensions=a=1", {"sasl.oauthbearer.extensions": "a=1"}),  # first = splits
    ('{"sasl.oauthbearer.scope": "kafka,profile", "socket.keepalive.enable": true}',
     {"sasl.oauthbearer.scope": "kafka,profile", "socket.keepalive.enable": "true"}),
    ("", {}),
])
def test_extra_from_env_is_name_value_pairs_or_json(fmnist_home: Path, text: str,
                                                    expected: dict[str, str]) -> None:
    assert dict(config.load(env={"FMNIST_KAFKA__EXTRA": text}).kafka.extra) == expected


@pytest.mark.parametrize(("text", "words"), [
    ("client.rack=eu,oops", "item 2 of 2 is not name=value"),
    ("=eu", "item 1 of 1 is not name=value"),
    ('{"client.rack": ', "is not a valid JSON object"),
    ('["client.rack"]', "must be a mapping of name: value"),
    ('{"client": {"rack": "eu"}}', "`kafka.extra.client` must be a string"),
    ('{"client.rack": null}', "`kafka.extra.client.rack` must be a string"),
])
def test_a_bad_extra_env_value_is_a_config_error_naming_the_variable(fmnist_home: Path,
                                                                     text: str,
                                                                     words: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(env={"FMNIST_KAFKA__EXTRA": text})
    assert info.value.message.startswith("environment variable FMNIST_KAFKA__EXTRA: ")
    assert words in info.value.message


def test_a_comma_in_a_pair_value_points_to_the_json_form(fmnist_home: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(env={"FMNIST_KAFKA__EXTRA": "ssl.key.password=pa,ss"})
    assert "JSON form" in info.value.hint
    assert "ss" not in info.value.message.replace("ssl", "")  # no fragment of the value shown


def test_a_bad_secret_value_is_not_echoed(fmnist_home: Path, tmp_path: Path) -> None:
    user = write(tmp_path / "u.yaml", "kafka:\n  extra:\n    ssl.key.password: [hunter2]\n")
    with pytest.raises(ConfigError) as info:
        config.load(user, env={})
    assert "`kafka.extra.ssl.key.password` must be a string, got ***" in info.value.message
    assert "hunter2" not in info.value.message


def test_a_non_mapping_extra_in_a_file_names_the_file(fmnist_home: Path, tmp_path: Path) -> None:
    user = write(tmp_path / "u.yaml", "kafka:\n  extra: client.rack=eu\n")
    with pytest.raises(ConfigError) as info:
        config.load(user, env={})
    assert info.value.message.startswith(f"{user}: `kafka.extra` must be a mapping")


def test_extra_layers_merge_property_by_property(fmnist_home: Path, tmp_path: Path) -> None:
    user = write(tmp_path / "u.yaml", "kafka:\n  extra: {client.rack: eu, linger.ms: 1}\n")
    cfg = config.load(user, env={"FMNIST_KAFKA__EXTRA": "client.rack=us,socket.nagle.disable=true"},
                      flags={"kafka.extra": {"ssl.key.password": "pw"}})
    assert dict(cfg.kafka.extra) == {"client.rack": "us", "linger.ms": "1",
                                     "socket.nagle.disable": "true", "ssl.key.password": "pw"}
    job = config.with_overrides(cfg, {"kafka": {"extra": {"client.rack": "ap"}}}, "job")
    assert dict(job.kafka.extra) == {**cfg.kafka.extra, "client.rack": "ap"}


def test_extra_is_read_only(fmnist_home: Path) -> None:
    extra = config.load(env={"FMNIST_KAFKA__EXTRA": "client.rack=eu"}).kafka.extra
    with pytest.raises(TypeError):
        extra["client.rack"] = "us"  # type: ignore[index]


def test_as_dict_masks_secret_properties_inside_extra(fmnist_home: Path) -> None:
    cfg = config.load(env={"FMNIST_KAFKA__EXTRA": '{"ssl.key.password": "hunter2", '
                           '"sasl.oauthbearer.client.secret": "s3", "client.rack": "eu", '
                           '"sasl.oauthbearer.token.endpoint.url": "https://idp/t"}'})
    assert config.as_dict(cfg)["kafka"]["extra"] == {
        "ssl.key.password": "***", "sasl.oauthbearer.client.secret": "***",
        "client.rack": "eu", "sasl.oauthbearer.token.endpoint.url": "***"}  # "token": masked
    assert config.as_dict(cfg, mask_secrets=False)["kafka"]["extra"]["ssl.key.password"] == (
        "hunter2")


def test_cli_config_shows_extra_with_secrets_masked(fmnist_home: Path) -> None:
    result = runner.invoke(app, ["config", "--json"], env={
        "FMNIST_KAFKA__EXTRA": "client.rack=eu-west-1a,ssl.key.password=hunter2"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kafka"]["extra"] == {"client.rack": "eu-west-1a",
                                                           "ssl.key.password": "***"}
    assert "hunter2" not in result.output
    yaml_out = runner.invoke(app, ["config"], env={"FMNIST_KAFKA__EXTRA": "client.rack=eu"})
    assert yaml.safe_load(yaml_out.stdout)["kafka"]["extra"] == {"client.rack": "eu"}


# --- Google's variables --------------------------------------------------------------------

EMULATOR, PROJECT = "pubsub.emulator_host", "pubsub.project_id"


@pytest.mark.parametrize(("env", "file", "flags", "expected"), [
    ({}, "", {}, ("127.0.0.1:8085", "fmnist-local")),  # configs/default.yaml
    ({"PUBSUB_EMULATOR_HOST": "emu:8681", "GOOGLE_CLOUD_PROJECT": "g-proj"}, "", {},
     ("emu:8681", "g-proj")),  # Google's variables beat the shipped defaults
    ({"PUBSUB_EMULATOR_HOST": "", "GOOGLE_CLOUD_PROJECT": ""}, "", {},
     ("127.0.0.1:8085", "fmnist-local")),  # set but empty: unset, as for Google's clients
    ({"GCLOUD_PROJECT": "old"}, "", {}, ("127.0.0.1:8085", "old")),
    ({"GCLOUD_PROJECT": "old", "GOOGLE_CLOUD_PROJECT": "new"}, "", {},
     ("127.0.0.1:8085", "new")),
    ({"PUBSUB_EMULATOR_HOST": "emu:8681", "GOOGLE_CLOUD_PROJECT": "g-proj"},
     "pubsub: {emulator_host: file:1, project_id: file-proj}\n", {},
     ("file:1", "file-proj")),  # a --config file beats them
    ({"PUBSUB_EMULATOR_HOST": "emu:8681", "GOOGLE_CLOUD_PROJECT": "g-proj"},
     "pubsub: {project_id: file-proj}\n", {}, ("emu:8681", "file-proj")),  # key by key
    ({"PUBSUB_EMULATOR_HOST": "emu:8681", "FMNIST_PUBSUB__EMULATOR_HOST": "",
      "GOOGLE_CLOUD_PROJECT": "g-proj", "FMNIST_PUBSUB__PROJECT_ID": "mine"}, "", {},
     ("", "mine")),  # FMNIST_PUBSUB__* beat them; "" = real Pub/Sub despite the emulator var
    ({"PUBSUB_EMULATOR_HOST": "emu:8681", "GOOGLE_CLOUD_PROJECT": "g-proj"}, "",
     {EMULATOR: "flag:2", PROJECT: "flag-proj"}, ("flag:2", "flag-proj")),
])
def test_google_variables_sit_between_the_shipped_defaults_and_the_users_settings(
        clean_env: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], file: str,
        flags: dict[str, str], expected: tuple[str, str]) -> None:
    user = write(tmp_path / "u.yaml", file) if file else None
    cfg = config.load(user, flags=flags, env=env)
    assert (cfg.pubsub.emulator_host, cfg.pubsub.project_id) == expected


def test_a_google_variable_is_named_when_its_value_is_bad(fmnist_home: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(env={"PUBSUB_EMULATOR_HOST": "emu:1"},
                    flags={"pubsub.ack_deadline_s": "soon"})
    assert "command-line option for pubsub.ack_deadline_s" in info.value.message
    cfg = config.load(env={"PUBSUB_EMULATOR_HOST": "emu:1"})
    assert cfg.pubsub.emulator_host == "emu:1"


def test_cli_config_shows_what_google_variables_select() -> None:
    result = runner.invoke(app, ["config", "--json"], env={"PUBSUB_EMULATOR_HOST": "emu:8681",
                                                            "GOOGLE_CLOUD_PROJECT": "g-proj"})
    assert result.exit_code == 0, result.output
    pubsub = json.loads(result.stdout)["pubsub"]
    assert (pubsub["emulator_host"], pubsub["project_id"]) == ("emu:8681", "g-proj")
