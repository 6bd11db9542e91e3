"""Importing the ML stack deliberately: thread pools, determinism, and which device runs.

TensorFlow is imported here and only when a command needs it, so `fmnist --help` and
`fmnist send` start instantly. TensorFlow's default pools use ~1.2 of 2 cores here, so they
are sized to the machine (or to `threads` in the config).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from functools import cache
from typing import Any

# Quiet TensorFlow's C++ start-up banner unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence what TensorFlow's C++ side prints while it loads (oneDNN and CUDA-probe lines
    that absl writes before any log level applies). Python exceptions still surface, after
    stderr is restored. FMNIST_TF_LOGS=1 shows everything."""
    if os.environ.get("FMNIST_TF_LOGS") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def freeze_heap() -> None:
    """Take every object alive now out of the cyclic garbage collector's sight (``gc.freeze``).

    A loaded and warmed model leaves ~260 k long-lived objects (JAX, Keras, the model). Each
    full (generation 2) collection scans them all: 130-160 ms with the serve loop stopped,
    every few seconds under load, the whole p99 at 200 req/s (docs/decisions.md#gc-freeze).
    Frozen objects are never scanned; the loop's short-lived garbage is still collected and
    reference counting frees as before. Called again after a hot reload: unfreeze
    first, so that the model swapped out (full of reference cycles) can be collected.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def select_backend(preferred: str = "auto", threads: int = 0, auto: str = "jax") -> str:
    """Choose the Keras backend for inference; call before Keras is first imported.

    JAX is the default where installed: its compiled forward pass costs ~0.3 ms per call where
    TensorFlow's graph dispatch costs ~1.5 ms whatever the model (docs/decisions.md#inference-on-jax), and
    it imports in 1.5 s instead of 5-9 s. Training asks for ``auto="tensorflow"``: XLA-compiled
    training measured ~2x slower on this CPU. Once Keras is imported its backend is fixed for
    the process: "auto" accepts it, an explicit choice that differs is a ConfigError.
    """
    import importlib.util

    from fmnist.errors import ConfigError

    if "keras" in sys.modules:
        active = sys.modules["keras"].backend.backend()
        if preferred not in ("auto", active):
            raise ConfigError(f"serve.backend is {preferred!r} but Keras already runs on {active!r} "
                              "in this process.", "Start a new process, or set serve.backend: auto.")
        return str(active)
    if preferred == "auto":
        # The other backend when ``auto``'s is not installed: a GPU machine with JAX and no
        # TensorFlow still trains (a job worker there runs train jobs on the GPU).
        installed = [b for b in (auto, "jax", "tensorflow") if importlib.util.find_spec(b)]
        preferred = os.environ.get("KERAS_BACKEND") or (installed[0] if installed
                                                        else "tensorflow")
    elif importlib.util.find_spec(preferred) is None:
        raise ConfigError(f"serve.backend is {preferred!r} but {preferred} is not installed.",
                          f"pip install {preferred}, or set serve.backend: auto.")
    os.environ["KERAS_BACKEND"] = preferred
    if preferred == "jax" and threads > 0:
        # XLA's CPU client has no thread-count option. It sizes its compute pools from NPROC
        # when that is set (meant for CI machines), else from the CPUs it may run on; jaxlib
        # 0.10's YNNPACK kernels ignore --xla_cpu_multi_thread_eigen (per-thread CPU under
        # load; docs/decisions.md#serve-threads), so NPROC is what bounds them.
        os.environ.setdefault("NPROC", str(threads))
        if threads == 1:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_cpu_multi_thread_eigen=false").strip()
    return preferred


def jax_compile_cache(folder: str) -> None:
    """Keep JAX's compiled code on disk: a restarted worker loads its forward passes (and
    Keras' weight-initialisation ops) instead of compiling them again - measured 6.6 s -> 1.3 s
    from import to a warmed model. A cache that cannot be written only costs that time."""
    if not folder:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def cpu_threads(requested: int = 0) -> int:
    return requested if requested > 0 else (os.cpu_count() or 1)


@cache
def keras_module(threads: int = 0, deterministic: bool = False) -> Any:
    """Import Keras once, with the backend's thread pools set before any op runs."""
    with quiet_native_stderr():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe logs here, not at import
    if keras.backend.backend() == "tensorflow":

        n = cpu_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(n)
        # Small CNNs are a chain of ops: one inter-op thread per core avoids oversubscription.
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, n)))
        if deterministic:
            tf.config.experimental.enable_op_determinism()
    return keras


def device_description(threads: int = 0) -> str:
    """"GPU: <name>" when the backend sees an accelerator, else "CPU, N threads"."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"GPU: {details.get('device_name', gpus[0].name)} (tensorflow)"
    elif backend == "jax":
        import jax

        devices = [d for d in jax.devices() if d.platform != "cpu"]
        if devices:
            return f"GPU: {devices[0].device_kind} (jax)"
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)} (torch)"
    return f"CPU, {cpu_threads(threads)} threads ({backend})"


def library_versions() -> dict[str, str]:
    import keras
    import numpy

    versions = {"keras": keras.__version__, "numpy": numpy.__version__,
                "backend": keras.backend.backend()}
    backend_module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    try:
        module = __import__(backend_module[versions["backend"]])
        versions[versions["backend"]] = module.__version__
    except (ImportError, KeyError):
        pass
    from fmnist import __version__

    versions["fmnist"] = __version__
    return versions
