"""Which Keras backend inference and training run on, decided before Keras is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def backend_in_a_fresh_process(code: str, **env: str) -> dict:
    """Run ``code`` (which prints JSON) where no Keras was imported yet."""
    clean = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**clean, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


SELECT = ("import json, os, sys; from fmnist.runtime import select_backend; "
          "chosen = select_backend({args}); import keras; "
          "print(json.dumps({{'chosen': chosen, 'keras': keras.backend.backend(), "
          "'tf': 'tensorflow' in sys.modules, 'xla_flags': os.environ.get('XLA_FLAGS', '')}}))")


def test_inference_defaults_to_jax_and_never_imports_tensorflow() -> None:
    got = backend_in_a_fresh_process(SELECT.format(args="'auto'"))
    assert got == {"chosen": "jax", "keras": "jax", "tf": False, "xla_flags": ""}


def test_training_defaults_to_tensorflow() -> None:
    got = backend_in_a_fresh_process(SELECT.format(args="'auto', auto='tensorflow'"))
    assert got["chosen"] == got["keras"] == "tensorflow"


def test_training_falls_back_to_jax_where_tensorflow_is_not_installed() -> None:
    code = ("import importlib.util, json; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda name, *a: None if name == 'tensorflow' "
            "else real(name, *a); from fmnist.runtime import select_backend; "
            "print(json.dumps({'chosen': select_backend('auto', auto='tensorflow')}))")
    assert backend_in_a_fresh_process(code) == {"chosen": "jax"}


def test_auto_respects_keras_backend_from_the_environment() -> None:
    got = backend_in_a_fresh_process(SELECT.format(args="'auto'"), KERAS_BACKEND="tensorflow")
    assert got["chosen"] == got["keras"] == "tensorflow"


CONV_CORES = ("import json, sys, time; from fmnist.runtime import select_backend; "
              "select_backend('jax', threads={threads}); import jax, jax.numpy as jnp\n"
              "x = jnp.ones((256, 28, 28, 32)); w = jnp.ones((3, 3, 32, 64))\n"
              "f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', "
              "dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum())\n"
              "f(x, w).block_until_ready(); cpu, wall = time.process_time(), time.perf_counter()\n"
              "while time.perf_counter() - wall < 1.0: f(x, w).block_until_ready()\n"
              "print(json.dumps({{'cores': (time.process_time() - cpu) / "
              "(time.perf_counter() - wall)}}))")


def test_one_inference_thread_keeps_xla_on_one_core() -> None:
    # Measured: ~1.0 core with threads=1 and ~2.0 with all threads on an idle 2-core machine.
    # (XLA's flag for one Eigen pool alone left its YNNPACK kernels on every core.)
    got = backend_in_a_fresh_process(CONV_CORES.format(threads=1))
    assert got["cores"] <= 1.15, got


def test_once_keras_is_imported_auto_accepts_it_and_a_different_choice_is_an_error() -> None:
    code = ("import json, keras; from fmnist.runtime import select_backend; "
            "from fmnist.errors import ConfigError\n"
            "other = 'jax' if keras.backend.backend() == 'tensorflow' else 'tensorflow'\n"
            "try:\n    select_backend(other); error = None\n"
            "except ConfigError as exc:\n    error = exc.message + ' ' + exc.hint\n"
            "print(json.dumps({'auto': select_backend('auto'), 'active': keras.backend.backend(),"
            " 'error': error}))")
    got = backend_in_a_fresh_process(code, KERAS_BACKEND="tensorflow")
    assert got["auto"] == got["active"] == "tensorflow"
    assert "already runs on 'tensorflow'" in got["error"] and "new process" in got["error"]


def test_compiled_forward_passes_are_cached_on_disk_for_the_next_start(tmp_path) -> None:
    cache = tmp_path / "jax-cache"
    weights = Path(__file__).resolve().parents[2] / "weights" / "fmnist.keras"
    code = ("import json; from pathlib import Path; from fmnist.model.predictor import Predictor; "
            f"p = Predictor(Path({str(weights)!r}), max_batch=2, compile_cache={str(cache)!r}); "
            "print(json.dumps({'backend': p.backend, 'buckets': sorted(p.bucket_ms)}))")
    got = backend_in_a_fresh_process(code)
    assert got == {"backend": "jax", "buckets": [1, 2]}
    assert len(list(cache.iterdir())) >= 2  # at least the two forward-pass shapes
