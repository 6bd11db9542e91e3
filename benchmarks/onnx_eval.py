"""ONNX Runtime against the served JAX/XLA forward pass: model-only speed, CPU and accuracy.

Run from the repository root with fmnist's own virtualenv (the JAX figures come from it):

    .venv/bin/python benchmarks/onnx_eval.py --weights weights/fmnist.keras --runs 5

It builds .venvs/onnx (``PINS``) when missing, and with ``--keras-export`` .venvs/onnx-export
(TensorFlow and tf2onnx); fmnist's dependencies stay as they are. Steps:

1. **export** (fmnist's venv): loads the weights as the worker does (``artifacts.load_model``),
   writes every layer's weights, the 10,000 test images and a calibration sample of the
   training split to .state/onnx/, and scores the test set through ``Predictor`` (JAX/XLA,
   the serving path: compiled power-of-two buckets, batch plan, temperature).
2. **build** (.venvs/onnx): the same network as an ONNX graph, written from those weights with
   ``onnx.helper`` (Rescaling and batch norm folded into the convolutions and dense layer, the
   dense kernel's rows permuted from Keras' NHWC flatten order to ONNX's NCHW); it must give the
   Keras probabilities within 1e-4. Then int8 copies with ``onnxruntime.quantization``: static
   (QDQ, per-channel int8 weights, uint8 activations, ranges from ``--calibration``
   training images) and dynamic (weights only; activation ranges per call). Every model scores
   the same test set; the pixels are the ones ``evaluate`` feeds the predictor (float32 0..255).
   With ``--keras-export`` also Keras' own exporter's graph (``model.export(format="onnx")``,
   TensorFlow backend) and its static int8, for comparison (systems ``ort-keras-*``).
3. **bench**: one long-lived process per system and thread count, driven round by round in a
   rotating order so that no system always runs first or last. Each round times batch sizes
   ``--batches`` for ``--seconds`` each on real test images: wall images/s and process CPU
   time (all threads) per image. The table gives the median over rounds, and the cores other
   processes used meanwhile (/proc/stat less this benchmark's processes). ``--busy`` times
   each pass while another thread keeps one core busy, as a saturated worker's loop does.

ONNX Runtime runs with ``intra_op_num_threads`` = the thread count, one inter-op thread and all
graph optimisations; ``nospin`` systems also set ``session.intra_op.allow_spinning=0`` (by
default its pool threads spin between calls, which costs CPU a worker would spend elsewhere).
JAX runs as ``Predictor`` sets it up for ``serve.threads`` (0 = all cores when the thread
count is the machine's). Results go to benchmarks/results/onnx/<UTC time>.json and .md; the
exported and quantised models stay in .state/onnx/.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VENVS = {"onnx": ROOT / ".venvs" / "onnx", "onnx-export": ROOT / ".venvs" / "onnx-export"}
STATE = ROOT / ".state" / "onnx"
RESULTS = ROOT / "benchmarks" / "results" / "onnx"
PINS = {"onnx": ["onnxruntime==1.32.0", "onnx==1.23.2", "numpy==2.4.6"],
        # --keras-export: Keras' own exporter (model.export(format="onnx") runs tf2onnx)
        "onnx-export": ["tensorflow==2.21.0", "keras==3.15.1", "tf2onnx==1.17.0", "onnx==1.23.2",
                        "protobuf==7.36.2", "numpy==2.4.6"]}
SYSTEMS = {  # name -> (venv, model file under STATE or None, spinning)
    "jax": ("main", None, True),
    "ort-fp32": ("onnx", "fp32.onnx", True),
    "ort-int8": ("onnx", "int8-static.onnx", True),
    "ort-int8-fp32first": ("onnx", "int8-static-fp32first.onnx", True),
    "ort-fp32-nospin": ("onnx", "fp32.onnx", False),
    "ort-int8-nospin": ("onnx", "int8-static.onnx", False),
    "ort-int8-dynamic": ("onnx", "int8-dynamic.onnx", True),
    # --keras-export only: the graph Keras' exporter writes, and its static int8 (Percentile)
    "ort-keras-fp32-nospin": ("onnx", "keras-fp32.onnx", False),
    "ort-keras-int8-nospin": ("onnx", "keras-int8-static.onnx", False),
}
# Static int8 models (QDQ, per-channel int8 weights, uint8 activations): activation ranges from
# the calibration images by ``calibrate_method``; ``first_conv_fp32`` leaves the 28x28 input
# convolution (3 % of the multiply-adds) in float. MinMax over every layer is built for its
# accuracy only: one extreme activation sets the whole range.
STATIC = {
    "int8-static.onnx": {"calibrate_method": "Percentile", "first_conv_fp32": False},
    "int8-static-fp32first.onnx": {"calibrate_method": "MinMax", "first_conv_fp32": True},
    "int8-static-minmax.onnx": {"calibrate_method": "MinMax", "first_conv_fp32": False},
}


def log(message: str) -> None:
    print(f"[onnx_eval] {message}", file=sys.stderr, flush=True)


def python_of(venv: str) -> str:
    return sys.executable if venv == "main" else str(VENVS[venv] / "bin" / "python")


def ensure_venv(name: str) -> dict[str, str]:
    """.venvs/<name> at ``PINS[name]`` (benchmarks/venvs.py)."""
    import venvs  # beside this script; standard library only

    return venvs.ensure(VENVS[name], PINS[name], log)


def keras_export(weights: Path) -> dict[str, Any]:
    """Keras' own ONNX export of the same weights (TensorFlow backend, tf2onnx), for comparison
    with the graph ``build_graph`` writes."""
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras

    model = keras.saving.load_model(weights, compile=False)
    model(np.zeros((1, 28, 28, 1), np.float32))  # the exporter wants a model that has been called
    model.export(str(STATE / "keras-fp32.onnx"), format="onnx")
    return {}


# -- step 1: export (fmnist's venv) ------------------------------------------------------------

def export(weights: Path, calibration: int) -> dict[str, Any]:
    from fmnist import config, data
    from fmnist.model import artifacts
    from fmnist.model.predictor import Predictor

    cfg = config.load()
    predictor = Predictor(weights, max_batch=256, top_k=cfg.model.top_k, threads=cfg.serve.threads,
                          backend="jax", compile_cache=cfg.serve.compile_cache)
    model, _ = artifacts.load_model(weights)
    layers, arrays = [], {}
    for i, layer in enumerate(model.layers):
        kind = type(layer).__name__
        spec: dict[str, Any] = {"kind": kind, "name": layer.name}
        if kind == "Rescaling":
            spec.update(scale=float(layer.scale), offset=float(layer.offset))
        elif kind == "Conv2D":
            if layer.padding != "same" or tuple(layer.strides) != (1, 1) or layer.use_bias:
                raise SystemExit(f"{layer.name}: only stride-1 'same' convolutions without bias")
            spec.update(kernel=list(layer.kernel_size))
        elif kind == "BatchNormalization":
            spec.update(epsilon=float(layer.epsilon))
        elif kind == "MaxPooling2D":
            spec.update(pool=list(layer.pool_size), strides=list(layer.strides), padding=layer.padding)
        elif kind == "Dense":
            spec.update(activation=layer.get_config()["activation"], bias=bool(layer.use_bias))
        elif kind not in ("InputLayer", "ReLU", "Dropout", "Flatten"):
            raise SystemExit(f"{layer.name}: layer {kind} is not covered by the ONNX builder")
        if kind == "Flatten":
            spec.update(shape=list(layer.input.shape[1:]))
        for j, w in enumerate(layer.get_weights()):
            arrays[f"w{i}_{j}"] = np.asarray(w, np.float32)
        spec["weights"] = [f"w{i}_{j}" for j in range(len(layer.get_weights()))]
        layers.append(spec)
    source = data.locate(cfg.data)
    test, train = data.load_split("test", source), data.load_split("train", source)
    rng = np.random.default_rng(0)
    calib = train.images[rng.choice(len(train.images), calibration, replace=False)]
    started = time.perf_counter()
    probs = predictor.probabilities(test.images)
    STATE.mkdir(parents=True, exist_ok=True)
    np.savez(STATE / "export.npz", test_images=test.images, test_labels=test.labels,
             calibration=calib, keras_probs=probs, **arrays)
    from importlib.metadata import version

    return {"layers": layers, "temperature": predictor.temperature, "name": predictor.name,
            "version": predictor.version, "multiply_adds": predictor.meta["metrics"].get("multiply_adds"),
            "accuracy": float(np.mean(probs.argmax(axis=1) == test.labels)),
            "test_seconds": time.perf_counter() - started, "bucket_ms": predictor.bucket_ms,
            "versions": {n: version(n) for n in ("keras", "jax", "jaxlib", "numpy")}}


# -- step 2: build (onnx venv) -----------------------------------------------------------------

def build_graph(layers: list[dict[str, Any]], arrays: Any) -> Any:
    """The Keras layers as one ONNX graph: [N, 28, 28, 1] float32 pixels -> [N, 10] softmax."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    current, scale, pending = "pixels", 1.0, None  # pending: (conv W, conv name) awaiting BN

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
        return name

    def emit(op: str, inputs: list[str], name: str, **attrs: Any) -> None:
        nonlocal current
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        current = name

    emit("Transpose", ["pixels"], "nchw", perm=[0, 3, 1, 2])
    for spec in layers:
        kind, name, w = spec["kind"], spec["name"], [arrays[k] for k in spec["weights"]]
        if kind == "Rescaling":
            if spec["offset"] != 0.0:
                raise SystemExit("Rescaling with an offset is not folded")
            scale *= spec["scale"]
        elif kind == "Conv2D":  # HWIO -> OIHW, the input scale folded into the first one
            pending = (w[0].transpose(3, 2, 0, 1) * scale, name)
            scale = 1.0
        elif kind == "Dense" and pending is None and not spec["bias"]:
            pending = (w[0], name)
        elif kind == "BatchNormalization":
            gamma, beta, mean, var = w
            s = gamma / np.sqrt(var + spec["epsilon"])
            kernel, owner = pending  # type: ignore[misc]
            pending = None
            if kernel.ndim == 4:
                k_h = kernel.shape[2]
                emit("Conv", [current, const(f"{owner}.W", kernel * s[:, None, None, None]),
                              const(f"{owner}.B", beta - mean * s)], owner,
                     kernel_shape=[k_h, kernel.shape[3]], pads=[k_h // 2] * 4)
            else:
                emit("Gemm", [current, const(f"{owner}.W", kernel * s[None, :]),
                              const(f"{owner}.B", beta - mean * s)], owner)
        elif kind == "ReLU":
            emit("Relu", [current], name)
        elif kind == "MaxPooling2D":
            if spec["padding"] != "valid":
                raise SystemExit("only 'valid' max pooling is built")
            emit("MaxPool", [current], name, kernel_shape=spec["pool"], strides=spec["strides"])
        elif kind == "Flatten":
            h, w_, c = spec["shape"]
            flat_order = np.arange(h * w_ * c).reshape(h, w_, c).transpose(2, 0, 1).ravel()
            spec["_order"] = flat_order
            emit("Flatten", [current], name, axis=1)
        elif kind == "Dense":  # the head: kernel (and bias), then softmax
            kernel = w[0]
            bias = w[1] if spec["bias"] else np.zeros(kernel.shape[1], np.float32)
            emit("Gemm", [current, const(f"{name}.W", kernel), const(f"{name}.B", bias)], f"{name}.logits")
            if spec["activation"] == "softmax":
                emit("Softmax", [current], "probabilities", axis=-1)
            elif spec["activation"] != "linear":
                raise SystemExit(f"{name}: activation {spec['activation']} is not built")
    # Keras flattens [H, W, C]; the graph flattens [C, H, W]: permute the first dense's rows.
    flatten = next(s for s in layers if s["kind"] == "Flatten")
    first_dense = next(n for n in nodes if n.op_type == "Gemm")
    weight = next(t for t in inits if t.name == first_dense.input[1])
    permuted = numpy_helper.to_array(weight)[flatten["_order"]]
    weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(permuted), weight.name))
    graph = helper.make_graph(
        nodes, "fmnist", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 28, 28, 1])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             producer_name="benchmarks/onnx_eval.py")


class Calibration:
    """onnxruntime.quantization.CalibrationDataReader over training images, 100 at a time
    (equal batches: the histogram calibrators stack them)."""

    def __init__(self, images: np.ndarray) -> None:
        x = images.astype(np.float32)[..., None]
        self.batches = iter([{"pixels": x[i:i + 100]} for i in range(0, len(x), 100)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def session(path: Path, threads: int, spinning: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def build(meta: dict[str, Any], threads: int) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    arrays = np.load(STATE / "export.npz")
    model = build_graph(meta["layers"], arrays)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, STATE / "fp32.onnx")
    quant_pre_process(str(STATE / "fp32.onnx"), str(STATE / "fp32-pre.onnx"), skip_symbolic_shape=True)
    first_conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    for file, settings in STATIC.items():
        quantize_static(str(STATE / "fp32-pre.onnx"), str(STATE / file), Calibration(arrays["calibration"]),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, settings["calibrate_method"]),
                        nodes_to_exclude=[first_conv] if settings["first_conv_fp32"] else [])
    quantize_dynamic(str(STATE / "fp32-pre.onnx"), str(STATE / "int8-dynamic.onnx"),
                     weight_type=QuantType.QInt8, per_channel=True)
    keras_files: tuple[str, ...] = ()
    if meta.get("keras_export"):  # the same static int8 recipe on Keras' exported graph
        quant_pre_process(str(STATE / "keras-fp32.onnx"), str(STATE / "keras-fp32-pre.onnx"),
                          skip_symbolic_shape=True)
        quantize_static(str(STATE / "keras-fp32-pre.onnx"), str(STATE / "keras-int8-static.onnx"),
                        Calibration(arrays["calibration"]), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile)
        keras_files = ("keras-fp32.onnx", "keras-int8-static.onnx")
    images = arrays["test_images"].astype(np.float32)[..., None]
    labels, reference = arrays["test_labels"], arrays["keras_probs"]
    out: dict[str, Any] = {"models": {}, "versions": {"onnxruntime": ort.__version__,
                                                      "onnx": onnx.__version__, "numpy": np.__version__}}
    for file in ("fp32.onnx", *STATIC, "int8-dynamic.onnx", *keras_files):
        sess = session(STATE / file, threads)
        probs = np.concatenate([soften(sess.run(None, {"pixels": images[i:i + 256]})[0],
                                       meta["temperature"]) for i in range(0, len(images), 256)])
        recipe = STATIC["int8-static.onnx"] if file == "keras-int8-static.onnx" else STATIC.get(file, {})
        out["models"][file] = {**recipe,
            "accuracy": float(np.mean(probs.argmax(axis=1) == labels)),
            "max_abs_diff_vs_keras": float(np.abs(probs - reference).max()),
            "argmax_agrees_with_keras": int(np.sum(probs.argmax(axis=1) == reference.argmax(axis=1))),
            "bytes": (STATE / file).stat().st_size}
    if out["models"]["fp32.onnx"]["max_abs_diff_vs_keras"] > 1e-4:
        raise SystemExit(f"fp32 ONNX graph differs from Keras: {out['models']['fp32.onnx']}")
    return out


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """fmnist.model.calibration.soften (this venv has no fmnist): the predictor's last step."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)


# -- step 3: bench workers ---------------------------------------------------------------------

def forward(system: str, threads: int, meta: dict[str, Any], weights: Path) -> Any:
    _, file, spinning = SYSTEMS[system]
    if file is None:
        from fmnist import config
        from fmnist.model.predictor import Predictor

        cfg = config.load()
        serve_threads = 0 if threads == os.cpu_count() else threads  # 0 = all cores, as served
        predictor = Predictor(weights, max_batch=256, top_k=cfg.model.top_k, threads=serve_threads,
                              backend="jax", compile_cache=cfg.serve.compile_cache)
        return predictor.probabilities
    sess = session(STATE / file, threads, spinning)
    return lambda x: soften(sess.run(None, {"pixels": x})[0], meta["temperature"])


class Busy:
    """A thread that keeps one core busy (SHA-256 over 1 MB blocks, which releases the GIL),
    standing in for a saturated worker's loop thread. ``cpu_s()`` reads its CPU clock, so that
    its time can be left out of the forward pass's."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        block = os.urandom(1 << 20)
        while not self.stop.is_set():
            hashlib.sha256(block).digest()

    def cpu_s(self) -> float:
        assert self.thread.ident is not None
        return time.clock_gettime(time.pthread_getcpuclockid(self.thread.ident))

    def __enter__(self) -> Busy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def measure(fn: Any, x: np.ndarray, seconds: float, busy: bool = False) -> dict[str, float]:
    for _ in range(3):
        fn(x)  # not timed
    with contextlib.ExitStack() as stack:
        other = stack.enter_context(Busy()) if busy else None
        other_cpu = other.cpu_s() if other else 0.0
        calls, wall, cpu = 0, time.perf_counter(), time.process_time()
        while (elapsed := time.perf_counter() - wall) < seconds or calls < 5:
            fn(x)
            calls += 1
        cpu_s = time.process_time() - cpu - ((other.cpu_s() - other_cpu) if other else 0.0)
    return {"images_per_s": len(x) * calls / elapsed, "cpu_us_per_image": cpu_s / (len(x) * calls) * 1e6,
            "cores": cpu_s / elapsed}


def worker(system: str, threads: int, meta: dict[str, Any], weights: Path) -> None:
    """Answer each "bench" line on stdin with one JSON line: the timings of one round."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the replies
    fn = forward(system, threads, meta, weights)
    pool = np.load(STATE / "export.npz")["test_images"].astype(np.float32)[..., None]
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        result = {str(b): measure(fn, pool[:b], request["seconds"], request["busy"])
                  for b in request["batches"]}
        print(json.dumps(result), file=reply, flush=True)


# -- orchestration -----------------------------------------------------------------------------

def busy_jiffies(pids: list[int]) -> tuple[int, int]:
    """(CPU ticks of the whole machine, of ``pids``) so far, from /proc."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    machine = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    ours = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        ours += int(stat[11]) + int(stat[12])  # utime, stime
    return machine, ours


def run_json(python: str, args: list[str], timeout: float) -> Any:
    done = subprocess.run([python, __file__, *args], stdout=subprocess.PIPE, timeout=timeout, check=True,
                          text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(summary: dict[str, Any], batches: list[int]) -> list[str]:
    head = ["system", "threads", "accuracy"] + [f"img/s @{b}" for b in batches] + \
        [f"CPU µs/img @{b}" for b in batches]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary.values():
        cells = [s["system"], str(s["threads"]), f"{s['accuracy'] * 100:.2f} %"]
        cells += [f"{s['median'][str(b)]['images_per_s']:,.0f}" for b in batches]
        cells += [f"{s['median'][str(b)]['cpu_us_per_image']:,.0f}" for b in batches]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=ROOT / "weights" / "fmnist.keras")
    ap.add_argument("--runs", type=int, default=5, help="rounds; every system runs once per round")
    ap.add_argument("--batches", default="1,64,128,256")
    ap.add_argument("--seconds", type=float, default=1.5, help="per batch size, system and round")
    ap.add_argument("--threads", default="2,1", help="thread counts; each system runs at each")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--calibration", type=int, default=1000, help="training images for int8 ranges")
    ap.add_argument("--keras-export", action="store_true",
                    help="also export with Keras' model.export (builds .venvs/onnx-export)")
    ap.add_argument("--busy", action="store_true",
                    help="time each forward pass with another thread keeping one core busy")
    ap.add_argument("--no-save", action="store_true", help="print the table, write no results")
    ap.add_argument("--role", choices=["export", "keras-export", "build", "worker"], help=argparse.SUPPRESS)
    ap.add_argument("--system", help=argparse.SUPPRESS)
    ap.add_argument("--meta", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    meta = json.loads(args.meta.read_text()) if args.meta else {}
    if args.role == "export":
        print(json.dumps(export(args.weights, args.calibration)))
        return 0
    if args.role == "keras-export":
        print(json.dumps(keras_export(args.weights)))
        return 0
    if args.role == "build":
        print(json.dumps(build(meta, int(args.threads))))
        return 0
    if args.role == "worker":
        worker(args.system, int(args.threads), meta, args.weights)
        return 0

    batches = [int(b) for b in args.batches.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    systems = args.systems.split(",")
    started_at = datetime.now(UTC)
    versions = {"onnx venv": ensure_venv("onnx")}
    if args.keras_export:
        versions["onnx-export venv"] = ensure_venv("onnx-export")
    log("export: Keras weights, test set and calibration sample; JAX accuracy through Predictor")
    exported = run_json(sys.executable, ["--role", "export", "--weights", str(args.weights),
                                         "--calibration", str(args.calibration)], 900)
    if args.keras_export:
        log("keras-export: model.export(format='onnx') on the TensorFlow backend")
        run_json(python_of("onnx-export"), ["--role", "keras-export", "--weights", str(args.weights)], 900)
    meta_file = STATE / "meta.json"
    meta_file.write_text(json.dumps({**exported, "keras_export": args.keras_export}))
    log("build: ONNX graph, int8 static and dynamic, test-set accuracy of each")
    built = run_json(python_of("onnx"), ["--role", "build", "--meta", str(meta_file),
                                         "--threads", str(max(thread_counts))], 1800)
    versions.update({"main venv": exported["versions"], "onnx venv": built["versions"]})
    accuracy = {"jax": exported["accuracy"]} | {
        s: built["models"][f]["accuracy"] for s, (_, f, _) in SYSTEMS.items() if f in built["models"]}
    lines_accuracy = [f"| {file} | {m.get('calibrate_method', '-')} | {m.get('first_conv_fp32', '-')} | "
                      f"{m['accuracy'] * 100:.2f} % | {(m['accuracy'] - exported['accuracy']) * 100:+.2f} | "
                      f"{m['argmax_agrees_with_keras']:,} | {m['max_abs_diff_vs_keras']:.2g} |"
                      for file, m in built["models"].items()]
    # One process per (system, threads); 1 thread has no pool to spin, so no nospin copies.
    keys = [(s, t) for t in thread_counts for s in systems if not (t == 1 and s.endswith("nospin"))]
    procs = {}
    for system, threads in keys:
        log(f"starting {system} at {threads} thread(s)")
        proc = subprocess.Popen([python_of(SYSTEMS[system][0]), __file__, "--role", "worker",
                                 "--system", system, "--threads", str(threads), "--meta", str(meta_file),
                                 "--weights", str(args.weights)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())  # ready: loaded and warmed, before any timing
        procs[(system, threads)] = proc
    rounds: dict[str, list[Any]] = {f"{s}@{t}": [] for s, t in keys}
    others: list[float] = []  # cores used by other processes during each round
    pids = [os.getpid(), *(p.pid for p in procs.values())]
    try:
        for r in range(args.runs):
            machine, ours, started = *busy_jiffies(pids), time.perf_counter()
            order = keys[r % len(keys):] + keys[:r % len(keys)]  # rotate who goes first
            if r % 2:
                order.reverse()
            for system, threads in order:
                proc = procs[(system, threads)]
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps({"batches": batches, "seconds": args.seconds,
                                                  "busy": args.busy}) + "\n")
                proc.stdin.flush()
                rounds[f"{system}@{threads}"].append(json.loads(proc.stdout.readline()))
            machine_now, ours_now = busy_jiffies(pids)
            others.append((machine_now - machine - ours_now + ours) / os.sysconf("SC_CLK_TCK")
                          / (time.perf_counter() - started))
            log(f"round {r + 1}/{args.runs} done; other processes used {others[-1]:.2f} cores")
    finally:
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=60)
    summary = {}
    for (system, threads) in keys:
        runs = rounds[f"{system}@{threads}"]
        summary[f"{system}@{threads}"] = {
            "system": system, "threads": threads, "accuracy": accuracy[system],
            "median": {str(b): {m: statistics.median(run[str(b)][m] for run in runs)
                                for m in ("images_per_s", "cpu_us_per_image", "cores")}
                       for b in batches},
            "runs": runs}
    command = "python benchmarks/onnx_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"started_at": started_at.isoformat(), "command": command, "machine": {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "python": platform.python_version()}, "versions": versions,
        "model": {k: exported[k] for k in ("name", "version", "multiply_adds", "temperature",
                                            "bucket_ms")},
        "onnx_models": built["models"], "other_processes_cores": others, "summary": summary}
    lines = [f"# ONNX Runtime against JAX/XLA: {exported['name']} {exported['version']}", "",
             f"`{command}` ({started_at:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores; medians of "
             f"{args.runs} rounds, systems in rotating order, {args.seconds:g} s per batch size; other "
             f"processes used {min(others):.2f}-{max(others):.2f} cores, median "
             f"{statistics.median(others):.2f}).",
             "", *table(summary, batches), "",
             "CPU µs/img is process CPU time (every thread) per image. Accuracy: the 10,000 test images.",
             *(["", "--busy: another thread kept one core busy (SHA-256, GIL released) while each "
                "forward pass was timed, as a saturated worker's loop thread does; its CPU is not "
                "counted."] if args.busy else []),
             "", f"Every ONNX model on the test set (JAX/XLA: {exported['accuracy'] * 100:.2f} %):", "",
             "| model | int8 ranges | first conv fp32 | accuracy | pt vs JAX | same class as JAX |"
             " max prob. diff |", "|---|---|---|---|---|---|---|", *lines_accuracy,
             "", "Versions: " + json.dumps(versions)]
    print("\n".join(lines))
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
        (RESULTS / f"{stamp}.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"{stamp}.md").write_text("\n".join(lines) + "\n")
        log(f"wrote {RESULTS.relative_to(ROOT)}/{stamp}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
