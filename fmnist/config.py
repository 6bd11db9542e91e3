"""One typed, frozen config shared by every command.

Precedence, lowest to highest, lives here and nowhere else:

    typed defaults < configs/default.yaml < Google's variables < --config FILE
        < FMNIST_<SECTION>__<KEY> env < flags

Google's own variables (``PUBSUB_EMULATOR_HOST``, ``GOOGLE_CLOUD_PROJECT``) stand for
``pubsub.emulator_host`` and ``pubsub.project_id``: above the shipped defaults, below anything
the user set for fmnist itself (``GOOGLE_ENV``).

Every layer is validated against the dataclasses below: an unknown key or a value of the wrong
type is a ``ConfigError`` that names the file, variable or flag it came from.

Relative paths: a value from a file inside the project (``configs/...``) or a typed default is
relative to the project root; a value from a file elsewhere is relative to that file's folder;
a value from an environment variable or a flag is relative to the current directory, because
that is where the user typed it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fmnist.errors import ConfigError

ENV_PREFIX = "FMNIST_"
SECRET_WORDS = ("password", "secret", "token", "credential")
# A secret key X may instead be read from a file named by the key X_file (a mounted Kubernetes
# or Docker secret): ``kafka.sasl_password_file`` / FMNIST_KAFKA__SASL_PASSWORD_FILE.
FILE_SUFFIX = "_file"
# Google's variables, in the order its clients read them, and the fmnist key each stands for.
GOOGLE_ENV = (("PUBSUB_EMULATOR_HOST", "pubsub.emulator_host"),
              ("GOOGLE_CLOUD_PROJECT", "pubsub.project_id"),
              ("GCLOUD_PROJECT", "pubsub.project_id"))


def is_secret(name: str) -> bool:
    """Whether a key or a librdkafka property holds a secret (its value is never printed). A
    ``<secret>_file`` key holds the path of the file the secret is read from: not a secret."""
    name = name.lower()
    return not name.endswith(FILE_SUFFIX) and any(word in name for word in SECRET_WORDS)


def project_root() -> Path:
    """The checkout that holds configs/, weights/ and Images/ (FMNIST_HOME overrides)."""
    if home := os.environ.get("FMNIST_HOME"):
        return Path(home).resolve()
    source_tree = Path(__file__).resolve().parent.parent
    if (source_tree / "configs" / "default.yaml").is_file():
        return source_tree
    return Path.cwd().resolve()


@dataclass(frozen=True)
class DataConfig:
    data_dir: Path | None = None
    download: bool = True
    mirror_url: str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    download_timeout_s: float = 30.0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "fmnist"
    weights_dir: Path = Path("weights")
    filters: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: int = 1
    dense_units: int = 256
    dropout: float = 0.2
    top_k: int = 3


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 24
    batch_size: int = 128
    learning_rate: float = 0.002
    weight_decay: float = 0.02
    label_smoothing: float = 0.05
    validation_split: float = 0.1
    augment: bool = True
    seed: int = 42
    threads: int = 0
    limit: int = 0
    # Knowledge distillation: train on a blend of the labels and this model's softened
    # predictions (a small serving model learns from a big one); None trains on labels alone.
    teacher: Path | None = Path("weights/fmnist-full.keras")
    distill_weight: float = 0.7
    distill_temperature: float = 2.0
    # Add the labelled images users sent back (``feedback.topic``) to the training images.
    with_feedback: bool = False


@dataclass(frozen=True)
class ImagingConfig:
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
    max_payload_bytes: int = 512 * 1024
    max_pixels: int = 4096 * 4096
    invert: str = "auto"


@dataclass(frozen=True)
class BrokerConfig:
    request_topic: str = "req_predict"
    response_topic: str = "res_predict"
    dlq_topic: str = "req_predict.dlq"
    # what a restarted worker reports of the requests in flight when its process died, for
    # every worker to read (fmnist/serving/crashes.py, docs/reliability.md#crash-loops)
    crash_topic: str = "req_predict.crashes"
    create_topics: bool = True
    connect_timeout_s: float = 10.0


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "fmnist"
    group_id: str = "fmnist-workers"
    partitions: int = 4
    replication_factor: int = 1
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = ""
    # the password's file (one line; a trailing newline is dropped), instead of sasl_password
    sasl_password_file: Path | None = None
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    compression: str = ""
    linger_ms: int = 0
    fetch_max_wait_ms: int = 5
    # librdkafka's group.instance.id: "" = dynamic membership; a stable id per worker makes it
    # a static member (docs/reliability.md#rebalances); two live workers must never share one.
    instance_id: str = ""
    # librdkafka properties (name -> value) on top of the client configs fmnist builds;
    # checked by librdkafka itself when the broker is made (fmnist/brokers/kafka/settings.py).
    extra: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))


@dataclass(frozen=True)
class PubsubConfig:
    project_id: str = "fmnist-local"
    emulator_host: str = "127.0.0.1:8085"
    request_subscription: str = "req_predict-sub"
    response_subscription: str = "res_predict-sub"
    dlq_subscription: str = "req_predict.dlq-sub"
    ack_deadline_s: int = 30


@dataclass(frozen=True)
class ServeConfig:
    broker: str = "kafka"
    max_batch_size: int = 256
    max_wait_ms: float = 0.0
    commit_every_ms: float = 100.0
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    worker_id: str = ""
    log_format: str = "text"
    log_level: str = "INFO"
    threads: int = 0
    backend: str = "auto"
    compile_cache: str = "~/.cache/fmnist/jax"
    # crash loops (docs/reliability.md#crash-loops): the requests in the handler, journalled
    # here per process; one in flight alone when this many worker processes died is refused
    journal_dir: str = "~/.cache/fmnist/inflight"
    max_crashes: int = 2


@dataclass(frozen=True)
class JobsConfig:
    topic: str = "fmnist_jobs"
    events_topic: str = "fmnist_job_events"
    dlq_topic: str = "fmnist_jobs.dlq"
    max_job_bytes: int = 64 * 1024
    progress_per_s: float = 2.0


@dataclass(frozen=True)
class RegistryConfig:
    store: str = "auto"
    topic: str = "fmnist_models"
    blob_topic: str = "fmnist_models.blobs"
    dir: Path = Path("models")
    events_topic: str = "fmnist_model_events"
    chunk_bytes: int = 512 * 1024
    follow: bool = True
    check_every_s: float = 30.0
    canary_dir: Path = Path("Images")
    canary_min_correct: int = 9
    publish_trained: bool = True


@dataclass(frozen=True)
class FeedbackConfig:
    topic: str = "fmnist_feedback"
    sent_dir: Path = Path("~/.cache/fmnist/sent")
    sent_keep: int = 1000


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    imaging: ImagingConfig = field(default_factory=ImagingConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    pubsub: PubsubConfig = field(default_factory=PubsubConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)

    @property
    def weights_path(self) -> Path:
        return self.model.weights_dir / f"{self.model.name}.keras"


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def routing(broker: str, request: str, response: str, dlq: str, group: str) -> dict[str, str]:
    """The settings that point workers and clients at one set of topics, as "section.key" ->
    value: Kafka's consumer group, and Pub/Sub subscriptions named after their topics."""
    return {"serve.broker": broker, "broker.request_topic": request,
            "broker.response_topic": response, "broker.dlq_topic": dlq, "kafka.group_id": group,
            "broker.crash_topic": f"{request}.crashes",
            "pubsub.request_subscription": f"{request}-sub",
            "pubsub.response_subscription": f"{response}-sub",
            "pubsub.dlq_subscription": f"{dlq}-sub"}


def env_name(dotted: str) -> str:
    """"serve.max_batch_size" -> "FMNIST_SERVE__MAX_BATCH_SIZE"."""
    section, _, key = dotted.partition(".")
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def _section_types(section: str) -> dict[str, Any]:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any, where: str, key: str, base: Path, from_text: bool) -> Any:
    """Check (and for env text, parse) one value against its declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # only `X | None` is used
        if value is None or (from_text and value == ""):
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(value, inner, where, key, base, from_text)
    if hint is Path:
        if not isinstance(value, (str, Path)) or str(value) == "":
            raise _type_error(where, key, value, "a path")
        path = Path(os.path.expanduser(str(value)))
        return path if path.is_absolute() else (base / path).resolve()
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
        raise _type_error(where, key, value, "true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(str(value))
            except ValueError:
                pass
        raise _type_error(where, key, value, "a whole number")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text:
            try:
                return float(str(value))
            except ValueError:
                pass
        raise _type_error(where, key, value, "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `client_id: 7` as an int; a string was meant
        raise _type_error(where, key, value, "a string")
    if origin is Mapping:
        return _coerce_mapping(value, args[1], where, key, base, from_text)
    if origin is tuple:
        if from_text and isinstance(value, str):
            items: Any = value.split(",") if value.strip() else []
        else:
            items = value
        if not isinstance(items, (list, tuple)):
            raise _type_error(where, key, value, "a list")
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, args[0], where, key, base,
                             from_text) for v in items)
    raise ConfigError(f"internal: no coercion for {hint!r}")  # pragma: no cover


def _coerce_mapping(value: Any, hint: Any, where: str, key: str, base: Path,
                    from_text: bool) -> Mapping[str, Any]:
    """A mapping of names to values (read-only). From env text: a JSON object, or
    ``name=value`` pairs separated by commas. A boolean for a text value is written the way
    librdkafka and YAML spell it: ``true`` / ``false``."""
    if from_text and isinstance(value, str):
        value = _parse_pairs(value, where, key)
    if not isinstance(value, Mapping):
        raise _type_error(where, key, value, "a mapping of name: value")
    out: dict[str, Any] = {}
    for name, item in value.items():
        name = str(name).strip()
        if not name:
            raise ConfigError(f"{where}: `{key}` has an entry with an empty name.")
        if hint is str and isinstance(item, bool):
            item = "true" if item else "false"
        out[name] = _coerce(item, hint, where, f"{key}.{name}", base, from_text)
    return types.MappingProxyType(out)


def _parse_pairs(text: str, where: str, key: str) -> Any:
    """``{"a": "1"}`` (JSON) or ``a=1,b=2``; an empty text is an empty mapping."""
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:  # its message has a position, never the text
            raise ConfigError(f"{where}: `{key}` is not a valid JSON object: {exc}.",
                              'Write it as {"name": "value", ...}.') from None
    pairs: dict[str, str] = {}
    items = text.split(",") if text else []
    for number, item in enumerate(items, 1):
        name, sep, val = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{where}: `{key}` item {number} of {len(items)} is not "
                              "name=value.",
                              'Separate pairs with commas; a value that contains a comma needs '
                              'the JSON form: {"name": "a,b"}.')
        pairs[name.strip()] = val.strip()
    return pairs


def _type_error(where: str, key: str, value: Any, expected: str) -> ConfigError:
    shown = "***" if is_secret(key) else repr(value)
    return ConfigError(f"{where}: `{key}` must be {expected}, got {shown}.",
                       "Fix the value, or run `fmnist config` to see every key with its type.")


def _apply(layers: dict[str, dict[str, Any]], data: Any, where: str, base: Path,
           from_text: bool = False, origins: dict[str, str] | None = None) -> None:
    """Validate one layer (a parsed file, env or flags) and merge it into ``layers``.

    ``origins`` records, per "section.key", where its current value came from, so a later range
    check can name the file, variable or flag to fix.
    """
    if data is None:
        return
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: the top level must be a mapping of sections.",
                          f"Sections are: {', '.join(SECTIONS)}.")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section `{section}`.",
                              f"Known sections: {', '.join(SECTIONS)}.")
        if values is None:  # `train:` with every key commented out
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}: section `{section}` must be a mapping of keys.")
        fields = _section_types(section)
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{where}: unknown key `{section}.{key}`.",
                                  f"Known keys in `{section}`: {', '.join(fields)}.")
            coerced = _coerce(value, fields[key], where, f"{section}.{key}", base, from_text)
            below = layers[section].get(key)
            if isinstance(coerced, Mapping) and isinstance(below, Mapping):
                coerced = types.MappingProxyType({**below, **coerced})  # entry by entry
            layers[section][key] = coerced
            if origins is not None:
                origins[f"{section}.{key}"] = where


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.",
                          "Check the path given to --config.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None


def _base_for(path: Path, root: Path) -> Path:
    path = path.resolve()
    return root if path.is_relative_to(root / "configs") else path.parent


def load(config_file: str | Path | None = None,
         flags: Mapping[str, Any] | None = None,
         env: Mapping[str, str] | None = None,
         use_default_file: bool = True) -> Config:
    """Build the effective config. ``flags`` maps "section.key" to values; None means unset."""
    root = project_root()
    env = os.environ if env is None else env
    layers: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    origins: dict[str, str] = {}
    # Typed defaults carry project-relative paths; anchor them to the project root.
    for section in SECTIONS:
        for key, hint in _section_types(section).items():
            default = getattr(getattr(Config(), section), key)
            if isinstance(default, Path):
                layers[section][key] = _coerce(default, hint, "defaults", key, root, False)
    default_file = root / "configs" / "default.yaml"
    if use_default_file and default_file.is_file():
        _apply(layers, _read_yaml(default_file), str(default_file), root, origins=origins)
    cwd = Path.cwd()
    for name, dotted in reversed(GOOGLE_ENV):  # the first one set wins, as in Google's clients
        if value := env.get(name, ""):  # set but empty counts as unset there too
            section, _, key = dotted.partition(".")
            _apply(layers, {section: {key: value}}, f"environment variable {name}", cwd,
                   from_text=True, origins=origins)
    if config_file is not None:
        path = Path(config_file)
        _apply(layers, _read_yaml(path), str(path), _base_for(path, root), origins=origins)
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == "FMNIST_HOME":
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        _apply(layers, {section: {key: value}}, f"environment variable {name}", cwd,
               from_text=True, origins=origins)
    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        _apply(layers, {section: {key: value}}, f"command-line option for {dotted}", cwd,
               origins=origins)
    _read_secret_files(layers, origins)
    cfg = Config(**{name: SECTIONS[name](**values) for name, values in layers.items()})
    _validate(cfg, origins)
    return cfg


def secret_file_keys(section: str) -> dict[str, str]:
    """The ``<secret>_file`` keys of a section, each with the secret key it fills."""
    fields = _section_types(section)
    return {key: key[:-len(FILE_SUFFIX)] for key in fields
            if key.endswith(FILE_SUFFIX) and key[:-len(FILE_SUFFIX)] in fields
            and is_secret(key[:-len(FILE_SUFFIX)])}


def _read_secret_files(layers: dict[str, dict[str, Any]], origins: Mapping[str, str]) -> None:
    """Fill each secret whose ``_file`` key is set from that file: its text, without the
    trailing newline an editor or ``echo`` leaves. Setting both the secret and its file is
    ambiguous, and an unreadable or empty file would only fail later as a refused login: each
    is a ConfigError naming the key, where it was set, and the path. The error never shows
    the file's content."""
    for section, values in layers.items():
        for file_key, key in secret_file_keys(section).items():
            path = values.get(file_key)
            if path is None:
                continue
            dotted, where = f"{section}.{file_key}", origins.get(f"{section}.{file_key}", "")
            if values.get(key):
                raise ConfigError(f"Both {section}.{key} (from {origins.get(f'{section}.{key}')})"
                                  f" and {dotted} (from {where}) are set.",
                                  f"Keep one: the file ({env_name(dotted)}) keeps the secret "
                                  "out of config files and environment listings.")
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or type(exc).__name__
                raise ConfigError(f"{dotted} (from {where}): cannot read {path}: {why}.",
                                  f"Point {dotted} / {env_name(dotted)} at a readable file "
                                  "that holds only the secret.") from None
            secret = text.removesuffix("\n").removesuffix("\r")
            if not secret:
                raise ConfigError(f"{dotted} (from {where}): {path} is empty.",
                                  f"Write the secret into it, or point {dotted} / "
                                  f"{env_name(dotted)} at the file that holds it.")
            values[key] = secret


def with_overrides(cfg: Config, data: Mapping[str, Any], where: str) -> Config:
    """``cfg`` with ``data`` ({section: {key: value}}, typed as JSON or YAML gives them) on top,
    checked by the same rules as a file: an unknown key, a wrong type or a value out of range
    is a ``ConfigError`` naming ``where`` and the key (a job's options use this)."""
    layers: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    origins: dict[str, str] = {}
    _apply(layers, data, where, Path.cwd(), origins=origins)
    for name, values in layers.items():  # a mapping adds to the one below, as in ``load``
        for key, value in values.items():
            below = getattr(getattr(cfg, name), key)
            if isinstance(value, Mapping) and isinstance(below, Mapping):
                values[key] = types.MappingProxyType({**below, **value})
    merged = Config(**{name: dataclasses.replace(getattr(cfg, name), **values)
                       for name, values in layers.items()})
    _validate(merged, origins)
    return merged


def user_settings(config_file: str | Path | None, flags: Mapping[str, Any],
                  env: Mapping[str, str] | None = None,
                  sections: tuple[str, ...] = ("train", "model")) -> dict[str, dict[str, Any]]:
    """What the user set in ``sections`` above configs/default.yaml (a ``--config`` file,
    ``FMNIST_*`` variables, flags), as plain data: a remote job carries these, and the job
    worker's own config supplies the rest (its paths, its dataset)."""
    env = os.environ if env is None else env
    layers: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    origins: dict[str, str] = {}
    if config_file is not None:
        path = Path(config_file)
        _apply(layers, _read_yaml(path), str(path), _base_for(path, project_root()),
               origins=origins)
    for name, value in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and "__" in name and name != "FMNIST_HOME":
            section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
            _apply(layers, {section: {key: value}}, f"environment variable {name}", Path.cwd(),
                   from_text=True, origins=origins)
    for dotted, value in flags.items():
        if value is not None:
            section, _, key = dotted.partition(".")
            _apply(layers, {section: {key: value}}, f"command-line option for {dotted}",
                   Path.cwd(), origins=origins)
    plain = as_dict(Config(**{name: SECTIONS[name](**values)
                              for name, values in layers.items()}), mask_secrets=False)
    return {section: {key: plain[section][key] for key in layers[section]}
            for section in sections if layers[section]}


def _validate(cfg: Config, origins: Mapping[str, str] | None = None) -> None:
    """Range and choice checks that a type alone cannot express; the error names the source."""
    from fmnist.brokers import SUPPORTED

    checks = [
        ("serve.broker", cfg.serve.broker in SUPPORTED,
         f"must be one of: {', '.join(f'`{name}`' for name in SUPPORTED)}"),
        ("serve.max_batch_size", cfg.serve.max_batch_size >= 1, "must be at least 1"),
        ("serve.max_wait_ms", cfg.serve.max_wait_ms >= 0, "must be 0 or more"),
        ("serve.commit_every_ms", cfg.serve.commit_every_ms >= 0, "must be 0 or more"),
        ("serve.backend", cfg.serve.backend in ("auto", "jax", "tensorflow"),
         "must be `auto`, `jax` or `tensorflow`"),
        ("serve.log_format", cfg.serve.log_format in ("text", "json"), "must be `text` or `json`"),
        ("serve.metrics_port", 0 <= cfg.serve.metrics_port <= 65535, "must be 0 (off) to 65535"),
        ("serve.metrics_host", bool(cfg.serve.metrics_host.strip()),
         "must name an address to listen on (0.0.0.0: every interface, 127.0.0.1: this host)"),
        ("jobs.max_job_bytes", cfg.jobs.max_job_bytes >= 1024, "must be at least 1024"),
        ("jobs.progress_per_s", 0 < cfg.jobs.progress_per_s <= 4, "must be in (0, 4]"),
        ("registry.store", cfg.registry.store in ("auto", "kafka", "dir"),
         "must be `auto` (the broker's own), `kafka` or `dir`"),
        ("registry.chunk_bytes", 1024 <= cfg.registry.chunk_bytes <= 900 * 1024,
         "must be 1024 to 921600 (under Kafka's default 1 MiB message limit)"),
        ("registry.check_every_s", cfg.registry.check_every_s > 0, "must be positive"),
        ("registry.canary_min_correct", cfg.registry.canary_min_correct >= 0,
         "must be 0 (no canary) or more"),
        ("feedback.sent_keep", cfg.feedback.sent_keep >= 0, "must be 0 (keep none) or more"),
        ("train.epochs", cfg.train.epochs >= 1, "must be at least 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be at least 1"),
        ("train.validation_split", 0.0 <= cfg.train.validation_split < 1.0, "must be in [0, 1)"),
        ("train.limit", cfg.train.limit >= 0, "must be 0 (all) or more"),
        ("train.distill_weight", 0.0 <= cfg.train.distill_weight <= 1.0, "must be in [0, 1]"),
        ("train.distill_temperature", cfg.train.distill_temperature > 0, "must be positive"),
        ("model.top_k", 1 <= cfg.model.top_k <= 10, "must be between 1 and 10"),
        ("model.filters", bool(cfg.model.filters) and min(cfg.model.filters) >= 1,
         "must list at least one stage, each with 1 or more filters"),
        ("model.dropout", 0.0 <= cfg.model.dropout < 1.0, "must be in [0, 1)"),
        ("imaging.invert", cfg.imaging.invert in ("auto", "always", "never"),
         "must be `auto`, `always` or `never`"),
        ("imaging.max_payload_bytes", cfg.imaging.max_payload_bytes > 0, "must be positive"),
        ("kafka.partitions", cfg.kafka.partitions >= 1, "must be at least 1"),
        ("kafka.instance_id", len(cfg.kafka.instance_id) <= 249
         and all(c.isascii() and (c.isalnum() or c in "._-") for c in cfg.kafka.instance_id)
         and cfg.kafka.instance_id not in (".", ".."),
         "must be at most 249 of a-z A-Z 0-9 . _ - (Kafka's rule; a pod name fits)"),
        ("data.download_timeout_s", cfg.data.download_timeout_s > 0, "must be positive"),
    ]
    for dotted, ok, message in checks:
        if not ok:
            section, _, key = dotted.partition(".")
            value = getattr(getattr(cfg, section), key)
            source = (origins or {}).get(dotted, "the built-in defaults")
            raise ConfigError(f"Invalid config: {dotted} {message}, got {value!r} (from {source}).",
                              "Fix it in that file, variable or flag; `fmnist config` shows the "
                              "effective values.")


def as_dict(cfg: Config, mask_secrets: bool = True) -> dict[str, dict[str, Any]]:
    """Plain data for printing and for meta.json; secrets become '***' when set, in mappings
    too (``kafka.extra``'s ``ssl.key.password``)."""
    return {section: {f.name: _plain(f.name, getattr(getattr(cfg, section), f.name),
                                     mask_secrets)
                      for f in dataclasses.fields(SECTIONS[section])}
            for section in SECTIONS}


def _plain(key: str, value: Any, mask_secrets: bool) -> Any:
    if isinstance(value, Mapping):
        return {name: _plain(name, item, mask_secrets) for name, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if mask_secrets and value and is_secret(key):
        return "***"
    return value
