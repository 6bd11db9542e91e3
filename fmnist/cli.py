"""The `fmnist` command: thin Typer commands over the library.

Each command builds the config (one loader for all), calls one library function and renders the
result. This is the one place that turns an ``FmnistError`` into a printed hint and an exit code.
Heavy imports (TensorFlow, broker clients) happen inside commands, so `--help` is instant.
One module on purpose (~460 lines): eleven commands of a few lines each, whose options, help
and examples are the CLI's reference and read best side by side.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from fmnist import config as config_module
from fmnist.errors import FmnistError, Interrupted

app = typer.Typer(
    name="fmnist",
    help="Fashion-MNIST classifier served behind Kafka or Google Cloud Pub/Sub.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML file layered over configs/default.yaml.",
                 show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def handle_errors(func: F) -> F:
    """Map library errors to one clean message and the exit code STYLE.md assigns."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from fmnist import console

        try:
            return func(*args, **kwargs)
        except FmnistError as exc:
            console.error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except ModuleNotFoundError as exc:
            from fmnist.installs import from_import_error

            # a package a client or serving install leaves out, reached by a path that has no
            # up-front check: the same clear error; any other missing module is a bug
            if (clear := from_import_error(f"`fmnist {func.__name__.removesuffix('_cmd')}`",
                                           exc)) is None:
                raise
            console.error(clear.message, clear.hint)
            raise typer.Exit(clear.exit_code) from None
        except KeyboardInterrupt:
            console.error("Interrupted.")
            raise typer.Exit(Interrupted.exit_code) from None

    return wrapper  # type: ignore[return-value]


def print_version(value: bool) -> None:
    if value:
        from fmnist import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def app_options(
    version: Annotated[bool, typer.Option(
        "--version", callback=print_version, is_eager=True,
        help="Print the installed version and exit.")] = False,
) -> None:
    """Options of `fmnist` itself; Typer adds --install-completion and --show-completion."""


def load_config(config_file: Path | None, **flags: Any) -> config_module.Config:
    """Flags are passed as section__key=value; None means the flag was not given."""
    return config_module.load(config_file, {k.replace("__", "."): v for k, v in flags.items()})


@app.command("config")
@handle_errors
def config_cmd(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Print the effective config (defaults < default.yaml < --config < env < flags).

    Examples:

        fmnist config
        fmnist config --config configs/train-full.yaml --json
        FMNIST_SERVE__MAX_BATCH_SIZE=64 fmnist config
    """
    from fmnist import console

    data = config_module.as_dict(load_config(config))
    if as_json:
        console.print_json(data)
        return
    import sys

    import yaml

    sys.stdout.write(yaml.safe_dump(data, sort_keys=False))  # not rich: it would wrap long lines


@app.command("data")
@handle_errors
def data_cmd(
    config: ConfigOption = None,
    download: Annotated[bool, typer.Option(
        "--download", help="Download the IDX files into data/ even if another copy exists.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Locate, verify (SHA-256) and describe the Fashion-MNIST dataset.

    Examples:

        fmnist data
        fmnist data --download --json
    """
    from fmnist import console, data

    cfg = load_config(config)
    with console.DownloadProgress() as progress:
        if download:
            target = cfg.data.data_dir or config_module.project_root() / "data"
            data.download(cfg.data.mirror_url, target, cfg.data.download_timeout_s, progress)
            source = data.Source(target, "idx")
        else:
            source = data.locate(cfg.data, progress)
    info = data.describe(source)
    if as_json:
        console.print_json(info)
        return
    console.info(f"Dataset: {source.describe()} — checksums verified.")
    classes = list(info["train"]["per_class"])  # type: ignore[index]
    console.table("Fashion-MNIST", ["class", "train", "test"],
                  [[c, info["train"]["per_class"][c], info["test"]["per_class"][c]]  # type: ignore[index]
                   for c in classes])


BrokerOption = Annotated[str | None, typer.Option(
    "--broker", "-b", help="kafka or pubsub (serve.broker).", show_default=False)]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="Seconds to wait for answers.")]
JobBrokerOption = Annotated[str | None, typer.Option(
    "--broker", "-b", show_default=False,
    help="Run as a job on a job worker over kafka or pubsub instead of here.")]
DetachOption = Annotated[bool, typer.Option(
    "--detach", help="With --broker: print the job id and return; `fmnist jobs watch` follows.")]
JobTimeoutOption = Annotated[float | None, typer.Option(
    "--timeout", help="With --broker: stop following after S seconds (the job goes on).",
    show_default=False)]


def run_remote(cfg: config_module.Config, kind: str, options: dict[str, Any], detach: bool,
               timeout: float | None, as_json: bool) -> dict[str, Any] | None:
    """Submit a job and follow it (or not, with ``detach``); the result event, or None."""
    from fmnist import console
    from fmnist.brokers import connect
    from fmnist.errors import Interrupted
    from fmnist.jobs import client as jobs

    b = connect(cfg.serve.broker, cfg)
    try:
        b.check(cfg.broker.connect_timeout_s)
        if detach:
            job = jobs.submit(b, cfg, kind, options)
            if as_json:
                console.print_json({"job_id": job.job_id, "status": "queued"})
            else:
                console.info(f"Job {job.job_id} queued on {b.name}.")
                console.out.print(job.job_id, highlight=False)
            return None
        view = console.JobView(b.name)
        try:
            return jobs.run(b, cfg, kind, options, view, timeout)
        except KeyboardInterrupt:
            view.detach()
            job_id = view.job_id or "?"
            raise Interrupted(f"Detached from job {job_id}; it goes on.",
                              f"Re-attach: fmnist jobs watch {job_id} --broker {b.name}   "
                              f"Stop it: fmnist jobs cancel {job_id} --broker {b.name}") from None
    finally:
        b.close()


def render_job_result(result: dict[str, Any], cfg: config_module.Config, as_json: bool) -> None:
    """A job's result as the local command prints it; its pictures saved here; exit code."""
    from fmnist import console
    from fmnist.jobs import client as jobs

    saved = jobs.save_pictures(result, cfg.model.weights_dir)
    error = result.get("error") or {}
    if as_json:
        console.print_json({k: v for k, v in result.items() if k != "pictures"}
                           | {"pictures": {k: str(p) for k, p in saved.items()}})
    elif result.get("status") == "succeeded" and result.get("kind") == "train":
        model, metrics = result["model"], result["metrics"]
        console.info(f"Job {result['job_id']} succeeded on {result.get('worker_id')}: saved "
                     f"{model['weights']} there (version {model['version']}); "
                     f"curve here: {saved.get('curve')}")
        console.out.print(
            f"test accuracy {metrics['test_accuracy']:.4f} after {metrics['epochs']} epochs in "
            f"{metrics['train_seconds']:.0f} s ({metrics['images_per_second']:.0f} img/s)",
            highlight=False)
        if published := result.get("published"):
            console.info(f"published {published['ref']} to {published['store']}; serve it "
                         f"everywhere: fmnist models promote {published['ref']} "
                         f"--broker {cfg.serve.broker}")
        elif result.get("publish_error"):
            console.error(f"The model was not published: {result['publish_error']}",
                          "Publish it by hand: fmnist models publish WEIGHTS")
    elif result.get("status") == "succeeded":
        render_evaluation(result["model"]["name"], result["model"]["version"],
                          result["per_class"], result["metrics"]["accuracy"],
                          result["metrics"]["loss"], saved.get("confusion"), saved.get("errors"))
    else:
        console.error(f"Job {result['job_id']} {result.get('status')}: "
                      f"{error.get('message', 'no reason given')}", error.get("hint"))
    if result.get("status") != "succeeded":
        raise typer.Exit(int(error.get("exit_code") or 1))


def render_evaluation(model: str, version: str, per_class: list[dict[str, Any]],
                      accuracy: float, loss: float, confusion: Any, errors: Any) -> None:
    from fmnist import console

    console.table(f"{model} ({version}) on the 10k test images",
                  ["class", "precision", "recall", "f1", "support"],
                  [[r["class_name"], f"{r['precision']:.4f}", f"{r['recall']:.4f}",
                    f"{r['f1']:.4f}", r["support"]] for r in per_class])
    console.out.print(f"accuracy {accuracy:.4f}  loss {loss:.4f}", highlight=False)
    console.info(f"Confusion matrix: {confusion}; worst mistakes: {errors}")


@app.command("train")
@handle_errors
def train_cmd(
    config: ConfigOption = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (train.epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (train.batch_size).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (train.seed).")] = None,
    name: Annotated[str | None, typer.Option(help="Model name: weights/<name>.keras.")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Train on the first N shuffled images only (quick checks).")] = None,
    with_feedback: Annotated[bool | None, typer.Option(
        "--with-feedback/--without-feedback", show_default=False,
        help="Also train on the labelled images users sent back (train.with_feedback; "
             "read from serve.broker's feedback.topic).")] = None,
    broker: JobBrokerOption = None,
    detach: DetachOption = False,
    timeout: JobTimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train the CNN on the 60k training images; save weights, meta.json and a curve PNG.

    With --broker it runs as a job on a job worker (`fmnist serve --jobs`), with the same
    progress here; the train.* and model.* settings you gave travel with it.

    Examples:

        fmnist train --epochs 1 --limit 2000 --name quick
        fmnist train --config configs/train-full.yaml
        fmnist train --broker kafka --epochs 2 --limit 3000 --name quick
        fmnist train --broker pubsub --detach --json
        fmnist train --broker kafka --with-feedback --name fmnist
    """
    from fmnist import console
    from fmnist.model import train

    flags = {"train.epochs": epochs, "train.batch_size": batch_size, "train.seed": seed,
             "model.name": name, "train.limit": limit, "train.with_feedback": with_feedback}
    cfg = load_config(config, serve__broker=broker, **{k.replace(".", "__"): v
                                                         for k, v in flags.items()})
    if broker is not None:
        from fmnist.jobs.protocol import carried_options

        options = carried_options("train", config_module.user_settings(config, flags))
        if "teacher" in options.get("train", {}):  # travels as a model name (docs/jobs.md)
            teacher = options["train"]["teacher"]
            options["train"]["teacher"] = Path(teacher).stem if teacher else None
        remote = run_remote(cfg, "train", options, detach, timeout, as_json)
        if remote is not None:
            render_job_result(remote, cfg, as_json)
        return
    from fmnist import feedback, installs

    installs.require("Training (`fmnist train` without --broker)", *installs.INFERENCE,
                     *installs.PLOTS)
    result = train.train(cfg, console.TrainProgress(), extra=feedback.for_training(cfg))
    metrics = result.meta["metrics"]
    if as_json:
        console.print_json({"weights": str(result.weights), **metrics})
        return
    console.info(
        f"Saved {result.weights} (version {result.meta['version']}); curve: {result.curve_png}")
    if "feedback_images" in metrics:
        console.info(f"{metrics['feedback_images']} labelled image(s) from "
                     f"{cfg.feedback.topic} ({cfg.serve.broker}) were in the training set.")
    console.out.print(
        f"test accuracy {metrics['test_accuracy']:.4f} after {metrics['epochs']} epochs in "
        f"{metrics['train_seconds']:.0f} s ({metrics['images_per_second']:.0f} img/s)",
        highlight=False)


@app.command("evaluate")
@handle_errors
def evaluate_cmd(
    config: ConfigOption = None,
    name: Annotated[str | None, typer.Option(help="Model name: weights/<name>.keras.")] = None,
    broker: JobBrokerOption = None,
    detach: DetachOption = False,
    timeout: JobTimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Test accuracy, loss, per-class precision/recall/F1, confusion-matrix and mistakes PNGs.

    With --broker a job worker evaluates its model of that name; the pictures come back here.

    Examples:

        fmnist evaluate
        fmnist evaluate --name fmnist-full --json
        fmnist evaluate --broker kafka --name fmnist
    """
    from fmnist import console
    from fmnist.model import evaluate

    cfg = load_config(config, model__name=name, serve__broker=broker)
    if broker is not None:
        options = {"model": {"name": name}} if name else {}
        remote = run_remote(cfg, "evaluate", options, detach, timeout, as_json)
        if remote is not None:
            render_job_result(remote, cfg, as_json)
        return
    from fmnist import installs

    installs.require("`fmnist evaluate` without --broker", *installs.INFERENCE, *installs.PLOTS)
    result = evaluate.evaluate(cfg)
    if as_json:
        console.print_json(result.as_dict())
        return
    render_evaluation(result.model, result.version, result.per_class, result.accuracy,
                      result.loss, result.confusion_png, result.errors_png)


@app.command("predict")
@handle_errors
def predict_cmd(
    images: Annotated[list[str], typer.Argument(help="Image files (PNG, JPEG, BMP, GIF, WebP).")],
    config: ConfigOption = None,
    name: Annotated[str | None, typer.Option(help="Model name: weights/<name>.keras.")] = None,
    top_k: Annotated[int | None, typer.Option(help="How many classes to list.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Classify local image files, no broker needed. Exit 3 if any file could not be read.

    Examples:

        fmnist predict Images/sneaker7.png --json
        fmnist predict Images/*.png --top-k 3
    """
    from fmnist import console
    from fmnist.model import predict

    cfg = load_config(config, model__name=name, model__top_k=top_k)
    results = predict.predict_files(cfg, images)
    if as_json:
        console.print_json(results)
    else:
        console.table(None, ["file", "class", "label", "confidence", "top-k"],
                      [[r["file"], r.get("class_name", "-"), r.get("label", "-"),
                        f"{r['confidence']:.3f}" if "confidence" in r else "-",
                        ", ".join(f"{t['class_name']} {t['probability']:.2f}" for t in r["top_k"])
                        if "top_k" in r else f"error: {r['error']['message']}"]
                       for r in results])
    if any("error" in r for r in results):
        raise typer.Exit(3)


@app.command("serve")
@handle_errors
def serve_cmd(
    broker: BrokerOption = None,
    config: ConfigOption = None,
    name: Annotated[str | None, typer.Option(help="Model name: weights/<name>.keras.")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="serve.max_batch_size")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="serve.max_wait_ms")] = None,
    bootstrap_servers: Annotated[str | None, typer.Option(
        help="Kafka brokers (kafka.bootstrap_servers).")] = None,
    group_id: Annotated[str | None, typer.Option(help="Kafka consumer group.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Logs only, no live status.")] = False,
    log_format: Annotated[str | None, typer.Option(help="text or json.")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ...")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve /metrics, /healthz, /readyz, /status on this port (serve.metrics_port).")] = None,
    reload: Annotated[bool, typer.Option(
        "--reload", help="Hot-reload the weights file when it changes (SIGHUP also reloads).")] = False,
    jobs: Annotated[bool, typer.Option(
        "--jobs", help="Be a job worker: run train and evaluate jobs, one at a time.")] = False,
) -> None:
    """Serve predictions: consume requests, predict in micro-batches, publish answers.

    With --jobs, run training and evaluation jobs from the jobs topic instead (docs/jobs.md).

    Examples:

        fmnist serve --broker kafka --metrics-port 9100
        fmnist serve --broker pubsub --reload --quiet --log-format json
        fmnist serve --broker kafka --jobs
    """
    from fmnist.serving import serve

    cfg = load_config(config, serve__broker=broker, model__name=name,
                      serve__max_batch_size=max_batch_size, serve__max_wait_ms=max_wait_ms,
                      kafka__bootstrap_servers=bootstrap_servers, kafka__group_id=group_id,
                      serve__log_format=log_format, serve__log_level=log_level,
                      serve__metrics_port=metrics_port)
    if jobs:
        from fmnist.errors import UsageError
        from fmnist.jobs.worker import serve_jobs

        if reload or cfg.serve.metrics_port:
            raise UsageError("--reload and --metrics-port (serve.metrics_port) are for serving "
                             "workers; a job worker (--jobs) has neither.",
                             "Run `fmnist serve --jobs` without them; `fmnist jobs list` shows "
                             "what job workers do.")

        from fmnist import installs

        installs.require("A job worker (`fmnist serve --jobs`)", *installs.INFERENCE,
                         *installs.PLOTS)
        serve_jobs(cfg)
        return
    serve.serve(cfg, live_status=not quiet, reload=reload)


@app.command("status")
@handle_errors
def status_cmd(
    port: Annotated[int | None, typer.Option(help="The worker's metrics port.")] = None,
    host: Annotated[str, typer.Option(help="The worker's host.")] = "127.0.0.1",
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Ask a running worker how it is (its /status endpoint). Exit 4 if unreachable or unready.

    Examples:

        fmnist status --port 9100
        fmnist status --port 9100 --json
    """
    import json
    import urllib.error
    import urllib.request

    from fmnist import console
    from fmnist.errors import BrokerError

    cfg = load_config(config, serve__metrics_port=port)
    url = f"http://{host}:{cfg.serve.metrics_port}/status"
    if not cfg.serve.metrics_port:
        raise BrokerError("No metrics port configured.", "Pass --port, the port given to "
                          "`fmnist serve --metrics-port`.")
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status = json.loads(response.read())
    except (urllib.error.URLError, OSError) as exc:
        raise BrokerError(f"No worker answers at {url} ({getattr(exc, 'reason', exc)}).",
                          "Is `fmnist serve --metrics-port PORT` running with that port?") from None
    if as_json:
        console.print_json(status)
    else:
        console.table(f"worker {status['worker_id']}", ["key", "value"],
                      [[k, v] for k, v in status.items() if k != "worker_id"])
    if not status.get("ready"):
        raise typer.Exit(4)


@app.command("send")
@handle_errors
def send_cmd(
    images: Annotated[list[str] | None, typer.Argument(
        help="Image files, or names in Images/ (default: sneaker7.png).")] = None,
    broker: BrokerOption = None,
    config: ConfigOption = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait for and print the answers.")] = False,
    timeout: TimeoutOption = 30.0,
    bootstrap_servers: Annotated[str | None, typer.Option(
        help="Kafka brokers (kafka.bootstrap_servers).")] = None,
    label: Annotated[str | None, typer.Option(
        "--label", "-l", show_default=False,
        help="The true label of every image (0-9 or a class name): the workers count "
             "whether they were right and keep the image for training.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Publish images as requests; with --wait, print each answer (exit 4 on timeout).

    What was sent is kept in feedback.sent_dir, so `fmnist feedback ID LABEL` can label it
    later.

    Examples:

        fmnist send sandal5.png --broker pubsub --wait
        fmnist send Images/*.png --broker kafka --wait --json
        fmnist send sneaker7.png --broker kafka --wait --label 7
    """
    from fmnist import client, console, feedback
    from fmnist.brokers import connect

    cfg = load_config(config, serve__broker=broker, kafka__bootstrap_servers=bootstrap_servers)
    true_label = feedback.parse_label(label) if label is not None else None
    outgoing = client.read_images(images or [], true_label)
    b = connect(cfg.serve.broker, cfg)
    try:
        b.check(cfg.broker.connect_timeout_s)
        results = client.send(b, cfg, outgoing, wait=wait, timeout_s=timeout)
    finally:
        b.close()
    if as_json:
        console.print_json(results)
    elif not wait:
        console.table(None, ["request_id", "file", "status"],
                      [[r["request_id"], r["file"], r["status"]] for r in results])
    else:
        render_answers(results, with_file=True)
    if any(r.get("status") == "error" for r in results):
        raise typer.Exit(3)


@app.command("feedback")
@handle_errors
def feedback_cmd(
    request_id: Annotated[str, typer.Argument(help="The id `fmnist send` printed.")],
    label: Annotated[str, typer.Argument(help="The true label: 0-9 or a class name.")],
    broker: BrokerOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Give the true label of a request sent from here: publish it, with the image, to
    feedback.topic, for accuracy per model version and `fmnist train --with-feedback`.

    Examples:

        fmnist feedback 5f0c1d2e9a7b4c3d8e1f2a3b4c5d6e7f 7 --broker kafka
        fmnist feedback 5f0c1d2e9a7b4c3d8e1f2a3b4c5d6e7f Sneaker -b pubsub --json
    """
    from fmnist import console, feedback
    from fmnist.brokers import connect
    from fmnist.data import CLASS_NAMES

    cfg = load_config(config, serve__broker=broker)
    true_label = feedback.parse_label(label)
    sent = feedback.recall(cfg, request_id)  # an unknown id fails before any broker is dialled
    b = connect(cfg.serve.broker, cfg)
    try:
        b.check(cfg.broker.connect_timeout_s)
        published = feedback.label_sent(b, cfg, request_id, true_label, sent=sent)
    finally:
        b.close()
    if as_json:
        console.print_json(published)
        return
    said = ("; the answer was not waited for" if published["predicted"] is None else
            f"; {published['model']['name']}@{published['model']['version']} said "
            f"{published['predicted']} ({CLASS_NAMES[published['predicted']]})")
    console.out.print(f"Labelled {request_id} ({Path(published['file']).name}) as {true_label} "
                      f"({CLASS_NAMES[true_label]}) on {published['topic']} "
                      f"({published['broker']}){said}.", highlight=False)


def render_answers(results: list[dict[str, Any]], with_file: bool = False) -> None:
    from fmnist import console

    columns = ["request_id", *(["file"] if with_file else []), "class", "confidence",
               "latency ms", "model"]
    console.table(None, columns, [
        [r.get("request_id"), *([Path(r.get("file") or "").name] if with_file else []),
         r.get("class_name") or f"error: {(r.get('error') or {}).get('code')}",
         f"{r['confidence']:.3f}" if r.get("confidence") is not None else "-",
         r.get("round_trip_ms", r.get("received_latency_ms")) or "-",
         f"{(r.get('model') or {}).get('name')}@{(r.get('model') or {}).get('version')}"]
        for r in results])


@app.command("listen")
@handle_errors
def listen_cmd(
    broker: BrokerOption = None,
    config: ConfigOption = None,
    count: Annotated[int | None, typer.Option(help="Stop after N answers.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop after S seconds.")] = None,
    from_beginning: Annotated[bool, typer.Option(
        help="Kafka: replay retained answers; Pub/Sub: drain res_predict-sub.")] = False,
    bootstrap_servers: Annotated[str | None, typer.Option(
        help="Kafka brokers (kafka.bootstrap_servers).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Print predictions as they arrive (JSON lines with --json). Ctrl+C stops.

    Examples:

        fmnist listen --broker kafka
        fmnist listen --broker pubsub --count 10 --timeout 60 --json
    """
    from fmnist import client, console
    from fmnist.brokers import connect

    cfg = load_config(config, serve__broker=broker, kafka__bootstrap_servers=bootstrap_servers)
    b = connect(cfg.serve.broker, cfg)
    try:
        b.check(cfg.broker.connect_timeout_s)
        def ready() -> None:
            console.info(f"Listening on {cfg.broker.response_topic} ({cfg.serve.broker}); "
                         "Ctrl+C to stop.")

        for answer in client.listen(b, cfg, count, timeout, from_beginning, on_ready=ready):
            if as_json:
                console.print_json_line(answer)
            else:
                error = answer.get("error") or {}
                console.out.print(
                    f"{answer.get('request_id')}  "
                    f"{answer.get('class_name') or 'error: ' + str(error.get('code'))}  "
                    f"{answer.get('confidence') or ''}  "
                    f"{answer.get('received_latency_ms') or '-'} ms", highlight=False)
    except KeyboardInterrupt:
        return
    finally:
        b.close()


@app.command("dlq")
@handle_errors
def dlq_cmd(
    broker: BrokerOption = None,
    config: ConfigOption = None,
    count: Annotated[int | None, typer.Option(help="Show at most N records.")] = None,
    timeout: Annotated[float, typer.Option(help="Stop reading after S seconds.")] = 5.0,
    as_json: JsonOption = False,
) -> None:
    """Show the dead-letter topic: rejected requests, why, and where they came from.

    Examples:

        fmnist dlq --broker kafka
        fmnist dlq --broker pubsub --count 20 --json
    """
    from fmnist import client, console
    from fmnist.brokers import connect

    cfg = load_config(config, serve__broker=broker)
    b = connect(cfg.serve.broker, cfg)
    try:
        b.check(cfg.broker.connect_timeout_s)
        records = list(client.dead_letters(b, cfg, count, timeout))
    finally:
        b.close()
    if as_json:
        console.print_json(records)
        return
    console.table(f"{cfg.broker.dlq_topic} ({len(records)} records)",
                  ["request_id", "code", "message", "source", "worker_id"],
                  [[r["request_id"], r["code"], r["message"], r["source"], r["worker_id"]]
                   for r in records])


jobs_app = typer.Typer(help="Training and evaluation jobs: list, watch and cancel them.",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def job_broker(config: Path | None, broker: str | None) -> tuple[config_module.Config, Any]:
    from fmnist.brokers import connect

    cfg = load_config(config, serve__broker=broker)
    b = connect(cfg.serve.broker, cfg)
    try:
        b.check(cfg.broker.connect_timeout_s)
    except BaseException:
        b.close()
        raise
    return cfg, b


@jobs_app.command("list")
@handle_errors
def jobs_list_cmd(broker: BrokerOption = None, config: ConfigOption = None,
                  as_json: JsonOption = False) -> None:
    """Every job the events topic holds: status, who, when, where, how long.

    Examples:

        fmnist jobs list --broker kafka
        fmnist jobs list --broker pubsub --json
    """
    import time

    from fmnist import console
    from fmnist.jobs import client as jobs

    cfg, b = job_broker(config, broker)
    try:
        states = jobs.jobs(b, cfg)
    finally:
        b.close()
    if as_json:
        console.print_json([s.as_dict() for s in states])
        return

    def when(t: float | None) -> str:
        return time.strftime("%m-%d %H:%M:%S", time.localtime(t)) if t else "-"

    console.table(f"{len(states)} job(s) on {cfg.serve.broker}",
                  ["job", "kind", "status", "by", "submitted", "worker", "attempts", "epochs",
                   "seconds", "result"],
                  [[s.job_id, s.kind or "-", s.status + (" (cancel requested)" if
                                                          s.cancel_requested and not s.ended
                                                          else ""),
                    s.submitted_by or "-", when(s.submitted_at), s.worker_id or "-", s.attempts,
                    f"{s.epoch or 0}/{s.epochs}" if s.epochs else "-",
                    s.duration_s() if s.duration_s() is not None else "-", job_summary(s.result)]
                   for s in states], no_wrap=("job", "status"))


def job_summary(result: dict[str, Any] | None) -> str:
    if not result:
        return "-"
    metrics = result.get("metrics") or {}
    if result.get("status") == "succeeded":
        accuracy = metrics.get("test_accuracy", metrics.get("accuracy"))
        model = result.get("model") or {}
        return f"{model.get('name')}@{model.get('version')} acc {accuracy:.4f}"
    return f"{(result.get('error') or {}).get('code')}"


@jobs_app.command("watch")
@handle_errors
def jobs_watch_cmd(
    job_id: Annotated[str, typer.Argument(help="The job's id (from `fmnist jobs list`).")],
    broker: BrokerOption = None, config: ConfigOption = None, timeout: JobTimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Re-attach to a job: its events so far, then live until its result (exit as the job).

    Examples:

        fmnist jobs watch job-20261204-101500-a1b2c3 --broker kafka
        fmnist jobs watch job-20261204-101500-a1b2c3 --broker pubsub --json
    """
    from fmnist import console
    from fmnist.errors import Interrupted
    from fmnist.jobs import client as jobs

    cfg, b = job_broker(config, broker)
    view = console.JobView(b.name)

    def on_event(e: dict[str, Any]) -> None:
        if as_json:  # one JSON line per event, pictures left out
            console.print_json_line({k: v for k, v in e.items() if k != "pictures"})
        else:
            view(e)

    try:
        result = jobs.watch(b, cfg, job_id, on_event, timeout)
    except KeyboardInterrupt:
        view.detach()
        raise Interrupted(f"Stopped watching job {job_id}; it goes on.",
                          f"Re-attach: fmnist jobs watch {job_id} --broker {b.name}") from None
    finally:
        b.close()
    if as_json:
        jobs.save_pictures(result, cfg.model.weights_dir)
        if result.get("status") != "succeeded":
            raise typer.Exit(int((result.get("error") or {}).get("exit_code") or 1))
        return
    render_job_result(result, cfg, as_json=False)


@jobs_app.command("cancel")
@handle_errors
def jobs_cancel_cmd(
    job_id: Annotated[str, typer.Argument(help="The job's id (from `fmnist jobs list`).")],
    broker: BrokerOption = None, config: ConfigOption = None, as_json: JsonOption = False,
) -> None:
    """Cancel a job: a queued one never starts, a running one stops at its next batch.

    Examples:

        fmnist jobs cancel job-20261204-101500-a1b2c3 --broker kafka
    """
    from fmnist import console
    from fmnist.jobs import client as jobs

    cfg, b = job_broker(config, broker)
    try:
        state = jobs.cancel(b, cfg, job_id)
    finally:
        b.close()
    if as_json:
        console.print_json({"job_id": job_id, "status": state.status, "cancel_requested": True})
        return
    console.info(f"Cancel requested for job {job_id} ({state.status}); its result will say "
                 f"cancelled. Follow it: fmnist jobs watch {job_id} --broker {cfg.serve.broker}")


# The group's own module imports the options and helpers defined above, so it comes last.
from fmnist.registry.commands import models_app  # noqa: E402

app.add_typer(models_app, name="models")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

