"""Architecture coverage: emit a package for a tiny random model of every causal-LM and vision-language type, check
it in a fresh process.

For each model type of transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, then each of
``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` that is not also a causal LM (built by ``AutoModelForImageTextToText``,
run on text only, as text calibration runs them):

1. **built**: ``seqgen.models.tiny_model(type)`` (fp32, seed 0), saved with ``save_pretrained`` to a temp directory;
2. **emitted**: ``emit_model(meta_model(config), ...)``: traced on the meta device, written as a package;
3. **loaded**: in a *fresh* process (which never imports the tracer) the saved model and ``seqgen.load(package)``;
4. **equal**: ``package.run(model, **batch)["logits"]`` equals ``model(**batch).logits`` (max abs diff 0.0) for the
   sample shape (2, 64) and (3, 9), with ``seqgen.verify.random_batch``;
5. **layers**: the number of subgraphs with targets equals ``num_hidden_layers`` of the text config (plus the
   encoder's layers of an encoder-decoder language model).

A row passes when all of these hold. With ``--calibrate`` the check worker then also quantizes the model it has
loaded (``seqgen.runtime.calibrate``, GPTQ W4 per channel with act-order, two batches, every token through every
expert) and checks that

6. **calibrated**: at least one weight was quantized, every quantized linear holds its dequantized codes, and no
   other parameter changed;
7. **round trip**: the model saved in compressed-tensors format (``seqgen.checkpoint.save_quantized``) loads with
   ``from_pretrained`` and its logits equal the in-memory quantized model's (max abs diff <= 1e-5); where the default
   (packed) load fails on the model's own code, the checkpoint decompressed while loading is compared instead;
8. **disk offload**: the same calibration with the weights left in the saved model's safetensors files (a meta
   skeleton, a streamed checkpoint) writes the same checkpoint, tensor for tensor.

The calibration columns are reported apart from the emit pass/fail. Types whose tiny config cannot be instantiated at
all are listed apart and not counted. Steps 1-2 run in emit workers, steps 3-8 in check workers: long-lived
subprocesses that take one type at a time and are replaced when a type runs past ``--timeout``.

    python bench/arch_sweep.py                        # every type, 2 parallel workers
    python bench/arch_sweep.py --only llama,gpt2 --jobs 1
    python bench/arch_sweep.py --write-docs           # also write docs/coverage.md
    python bench/arch_sweep.py --calibrate            # also quantize, save, reload and calibrate from disk

Results: ``bench/results/arch_sweep.json`` (gitignored); a summary table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "arch_sweep.json"
DOCS = REPO / "docs" / "coverage.md"
SHAPES = [(2, 64), (3, 9)]
MARK = "@@seqgen-sweep "  # prefix of the worker's result lines; libraries may print other lines to stdout


# ---- workers (subprocesses) ------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    """The error as one line: its type and the first non-empty line of its message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:  # "validation error for validator 'x':" then the cause
        text = f"{text} {lines[1]}"
    return f"{type(exc).__name__}: {text}"[:400]


def _layers_run(model: Any, depth: Any) -> dict[str, list[bool]]:
    """Flags, filled in by forward hooks, of which items of each ``depth``-long module list run in eager mode."""
    import torch

    ran: dict[str, list[bool]] = {}
    if not isinstance(depth, int):
        return ran
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth:
            flags = ran[name] = [False] * depth
            for i, item in enumerate(module):
                item.register_forward_hook(lambda *_, flags=flags, i=i: flags.__setitem__(i, True))
    return ran


def _meta_twin(model: Any) -> Any:
    """The model rebuilt from its (saved) config on the meta device, as ``seqgen emit`` builds it."""
    from seqgen.models import meta_model

    return meta_model(model.config)


def _emit_one(arch: str, workdir: Path, build_only: bool = False) -> dict[str, Any]:
    import torch

    from seqgen.emitter import emit_model
    from seqgen.models import tiny_model
    from seqgen.verify import random_batch

    row: dict[str, Any] = {"arch": arch, "built": False, "emitted": False}
    start = time.perf_counter()
    try:
        model = tiny_model(arch)
        row["model_class"] = type(model).__name__
        text_config = model.config.get_text_config()
        row["decoder_layers"] = getattr(text_config, "num_hidden_layers", None)
        layers = getattr(text_config, "num_layers", None)  # longcat_flash: num_hidden_layers counts sublayers
        if (
            isinstance(layers, int)
            and layers != row["decoder_layers"]
            and any(isinstance(m, torch.nn.ModuleList) and len(m) == layers for m in model.modules())
        ):
            row["decoder_layers"] = layers
        encoder = getattr(text_config, "encoder_layers", None)  # Florence-2: a whole encoder-decoder language model
        if isinstance(encoder, int) and any(
            name.endswith("encoder.layers") and len(m) == encoder
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.ModuleList)
        ):
            row["decoder_layers"] += encoder
        row["vocab_size"] = text_config.vocab_size
        model_dir = workdir / arch / "model"
        model.save_pretrained(model_dir)
        row["model_dir"] = str(model_dir)
    except Exception as exc:  # noqa: BLE001 - every failure is a row
        row.update(stage="build", error=_first_line(exc), traceback=traceback.format_exc()[-3000:])
        row["seconds_build"] = round(time.perf_counter() - start, 2)
        return row
    try:  # the reference itself must run on a text batch, or there is nothing to compare with
        ran = _layers_run(model, row["decoder_layers"])
        with torch.no_grad():
            for batch_size, seq_len in SHAPES:
                model(**random_batch(text_config.vocab_size, batch_size, seq_len, seed=seq_len))
        row["built"] = True
        row["layers_run"] = max((sum(flags) for flags in ran.values() if any(flags)), default=None)
    except Exception as exc:  # noqa: BLE001
        row.update(stage="eager", error=_first_line(exc), traceback=traceback.format_exc()[-3000:])
    row["seconds_build"] = round(time.perf_counter() - start, 2)
    if not row["built"] or build_only:
        return row
    start = time.perf_counter()
    NOTES.clear()
    try:
        with torch.no_grad():
            result = emit_model(_meta_twin(model), workdir / arch / "package", force=True)
        if NOTES:
            row["notes"] = list(NOTES)
        row["emitted"] = True
        row["package_dir"] = str(result.path)
        row["subgraphs"] = len(result.index["subgraphs"])
        row["target_subgraphs"] = sum(1 for sg in result.index["subgraphs"] if sg["targets"])
        row["targets"] = sum(len(sg["targets"]) for sg in result.index["subgraphs"])
        row["guards"] = len(result.index["guards"])
    except Exception as exc:  # noqa: BLE001
        row["stage"] = "emit"
        row["error"] = _first_line(exc)
        row["traceback"] = traceback.format_exc()[-3000:]
    row["seconds_emit"] = round(time.perf_counter() - start, 2)
    return row


def _check_one(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    import seqgen
    from seqgen.verify import random_batch

    row: dict[str, Any] = {"loaded": False, "equal": False}
    start = time.perf_counter()
    try:
        model = _from_pretrained(task["model_dir"], dtype=torch.float32)
        package = seqgen.load(task["package_dir"])
        row["loaded"] = True
    except Exception as exc:  # noqa: BLE001
        row.update(stage="load", error=_first_line(exc), traceback=traceback.format_exc()[-3000:])
        return row
    diffs: dict[str, float] = {}
    try:
        for batch_size, seq_len in SHAPES:
            batch = random_batch(task["vocab_size"], batch_size, seq_len, seed=seq_len)
            with torch.no_grad():
                expected = model(**batch).logits
                actual = package.run(model, **batch)["logits"]
            if expected.shape != actual.shape:
                raise AssertionError(f"logits shape {tuple(actual.shape)} != eager {tuple(expected.shape)}")
            key = f"{batch_size}x{seq_len}"
            diffs[key] = (expected - actual).abs().max().item()
            if diffs[key] != 0.0:  # is it the eager cache path? the package runs the layers without a KV cache
                with torch.no_grad():
                    uncached = model(**batch, use_cache=False).logits
                row.setdefault("diffs_vs_use_cache_false", {})[key] = (uncached - actual).abs().max().item()
    except Exception as exc:  # noqa: BLE001
        row.update(stage="run", error=_first_line(exc), traceback=traceback.format_exc()[-3000:])
    row["diffs"] = diffs
    row["equal"] = len(diffs) == len(SHAPES) and all(d == 0.0 for d in diffs.values())
    if "error" not in row and not row["equal"]:
        row["stage"] = "compare"
        row["error"] = "logits differ from eager: " + ", ".join(f"{k}: {v:.3g}" for k, v in diffs.items())
    row["seconds_check"] = round(time.perf_counter() - start, 2)
    if task.get("calibrate") and row["equal"]:
        start = time.perf_counter()
        row.update(_calibrate_one(model, package, task))
        row["seconds_calibrate"] = round(time.perf_counter() - start, 2)
    traced = sorted(n for n in sys.modules if n.startswith(("seqgen.trace", "seqgen.emitter")))
    if traced:
        row["tracer_imported"] = traced
    return row


def _from_pretrained(directory: str | Path, **kwargs: Any) -> Any:
    """The saved model, through the class seqgen loads it with."""
    import transformers

    from seqgen.models import auto_class

    return auto_class(transformers.AutoConfig.from_pretrained(directory)).from_pretrained(directory, **kwargs).eval()


CAL_ATOL = 1e-5  # reloaded compressed model vs the in-memory quantized one: the same weights, another dequantize


def _calibrate_one(model: Any, package: Any, task: dict[str, Any]) -> dict[str, Any]:
    """Quantize ``model`` in place with the package, save it compressed, reload it, compare (steps 6 and 7)."""
    import torch
    import transformers

    from seqgen.algorithms import QuantScheme
    from seqgen.checkpoint import save_quantized
    from seqgen.runtime import CalibrationOptions, calibrate
    from seqgen.verify import random_batch

    row: dict[str, Any] = {"cal_calibrated": False, "cal_round_trip": False}
    vocab = task["vocab_size"]
    probe = random_batch(vocab, 2, 11, seed=7)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}  # one name per (tied) parameter
    aliases: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), set()).add(name)
    warnings: list[str] = []
    capture = _Capture(warnings)
    logging.getLogger("seqgen").addHandler(capture)
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    stage = "calibrate"
    try:
        with torch.no_grad():
            fp_logits = model(**probe).logits
        options = CalibrationOptions(scheme=QuantScheme(bits=4, group_size=None, act_order=True), all_experts=True)
        batches = [random_batch(vocab, 2, 16, seed=100 + i) for i in range(2)]
        result = calibrate(model, package, batches, options)
        row["cal_linears"] = len(result.quantized)
        row["cal_experts"] = len(result.experts)
        row["cal_linears_left"] = len(linears - set(result.quantized))  # lm_head, vision towers, ...
        changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
        quantized = {f"{name}.weight" for name in result.quantized}
        quantized |= {key.rsplit(".", 1)[0] for key in result.experts}  # "<module>.<param>.<expert>"
        quantized |= {alias for name in quantized for alias in aliases[id(model.get_parameter(name))]}
        if not quantized:
            raise AssertionError("nothing was quantized")
        unexpected = sorted(changed - quantized)
        if unexpected:
            raise AssertionError(f"{len(unexpected)} parameters changed that were not quantized: {unexpected[:3]}")
        for name, qweight in result.quantized.items():
            if not torch.equal(model.get_submodule(name).weight, qweight.dequantize()):
                raise AssertionError(f"{name} does not hold its dequantized codes")
        with torch.no_grad():
            quant_logits = model(**probe).logits
        row["cal_logits_change"] = (quant_logits - fp_logits).abs().max().item()
        if not torch.isfinite(quant_logits).all():
            raise AssertionError("the quantized model's logits are not finite")
        row["cal_calibrated"] = True
        stage = "save"
        out = Path(task["model_dir"]).parent / "quantized"
        save_quantized(model, result.quantized, out, experts=result.experts)
        stage = "reload"

        def reload(**kwargs: Any) -> Any:
            return _from_pretrained(out, **kwargs)

        try:  # transformers' default: quantized linears stay packed, decompressed in forward (what vLLM reads)
            reloaded = reload()
            row["cal_reload"] = "packed"
        except Exception as exc:  # noqa: BLE001 - e.g. model code that reads a quantized linear's .weight
            # the same checkpoint, decompressed while loading: tells a wrong checkpoint from a loader limitation
            row["cal_packed_error"] = _first_line(exc)
            reloaded = reload(quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
            row["cal_reload"] = "decompressed"
        with torch.no_grad():
            reloaded_logits = reloaded(**probe).logits
        row["cal_round_trip_diff"] = (reloaded_logits - quant_logits).abs().max().item()
        row["cal_round_trip"] = row["cal_round_trip_diff"] <= CAL_ATOL
        if not row["cal_round_trip"]:
            stage = "compare"
            raise AssertionError(f"reloaded logits differ by {row['cal_round_trip_diff']:.3g}")
    except Exception as exc:  # noqa: BLE001 - every failure is a row
        row.update(cal_stage=stage, cal_error=_first_line(exc), cal_traceback=traceback.format_exc()[-3000:])
    finally:
        logging.getLogger("seqgen").removeHandler(capture)
    if stage in ("reload", "compare") or row["cal_round_trip"]:  # saved: the same job with weights left on disk
        try:
            _disk_check(task, package, batches, options, out)
            row["cal_disk"] = True
        except Exception as exc:  # noqa: BLE001
            row.update(
                cal_disk=False, cal_disk_error=_first_line(exc), cal_disk_traceback=traceback.format_exc()[-3000:]
            )
    if any("which transformers" in w and "drops while loading" in w for w in warnings):
        row["cal_loader_warning"] = True  # seqgen's save warned that transformers' loader loses dense tensors
    return row


def _disk_check(task: dict[str, Any], package: Any, batches: list[Any], options: Any, memory_out: Path) -> None:
    """Step 8: calibrate again with the weights left in the saved model's safetensors files (``--offload disk``: a
    meta skeleton, one subgraph's tensors read at a time, the checkpoint written as it goes); the checkpoint must be
    the in-memory run's, tensor for tensor."""
    import dataclasses

    import torch

    from seqgen.checkpoint import SafetensorsWeights, StreamingSaver
    from seqgen.job import _disk_model
    from seqgen.runtime import calibrate
    from seqgen.verify import checkpoint_differences

    directory = Path(task["model_dir"])
    skeleton = _disk_model(directory, torch.float32)
    weights = SafetensorsWeights(directory, skeleton)
    disk_out = memory_out.parent / "quantized-disk"
    with StreamingSaver(skeleton, weights, disk_out) as saver:
        calibrate(
            skeleton,
            package,
            batches,
            dataclasses.replace(options, reuse_allocations=False),
            weights=weights,
            on_subgraph_done=saver.add,
            keep_results=False,
        )

    differences = checkpoint_differences(memory_out, disk_out)
    if differences:
        raise AssertionError(
            f"{len(differences)} differences from the in-memory run's checkpoint, e.g. " f"{differences[0]}"
        )


class _Capture(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


def calibrated(row: dict[str, Any]) -> bool:
    return bool(row.get("cal_calibrated") and row.get("cal_round_trip"))


NOTES: list[str] = []  # what the tracer logged about the current architecture (use_cache=False, skipped layers)


class _Notes(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "use_cache=False" in message or "skips" in message:
            NOTES.append(message.splitlines()[0][:300])


def worker_main(kind: str, workdir: Path) -> None:
    """Serve tasks from stdin (one JSON line each), answer one marked JSON line each on stdout."""
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    seqgen_logger = logging.getLogger("seqgen")
    seqgen_logger.setLevel(logging.INFO)
    seqgen_logger.propagate = False
    seqgen_logger.addHandler(_Notes())
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not interleave with the result lines
    for line in sys.stdin:
        task = json.loads(line)
        try:
            if kind == "check":
                result = _check_one(task)
            else:
                result = _emit_one(task["arch"], workdir, build_only=kind == "build")
        except BaseException as exc:  # noqa: BLE001 - report, then go on with the next type
            result = {"stage": kind, "error": _first_line(exc), "traceback": traceback.format_exc()[-3000:]}
        out.write(MARK + json.dumps(result, default=str) + "\n")
        out.flush()


# ---- driver --------------------------------------------------------------------------------------------------


class Worker:
    """One worker subprocess; ``ask`` returns its answer or None after ``timeout`` seconds (then it is killed)."""

    def __init__(self, kind: str, workdir: Path, log: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self.log_path = log
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", self.kind, "--workdir", str(self.workdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=REPO,
            env=env,
        )
        log.close()
        self.lines = queue.Queue()
        proc, lines = self.proc, self.lines

        def pump() -> None:
            assert proc.stdout is not None
            for text in proc.stdout:
                if text.startswith(MARK):
                    lines.put(text[len(MARK) :])
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def ask(self, task: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(task) + "\n")
            self.proc.stdin.flush()
            line = self.lines.get(timeout=timeout)
        except (queue.Empty, BrokenPipeError):
            line = None
        if line is None:
            self.stop()
            return None
        return json.loads(line)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


def _run_phase(
    kind: str, tasks: list[dict[str, Any]], jobs: int, timeout: float, workdir: Path, on_result: Any
) -> None:
    pending: queue.Queue[dict[str, Any]] = queue.Queue()
    for task in tasks:
        pending.put(task)

    def serve(slot: int) -> None:
        worker = Worker(kind, workdir, workdir / f"{kind}-worker-{slot}.log")
        try:
            while True:
                try:
                    task = pending.get_nowait()
                except queue.Empty:
                    return
                start = time.perf_counter()
                result = worker.ask(task, timeout)
                if result is None:
                    result = {"stage": kind, "error": f"timed out after {timeout:.0f}s (or the worker died)"}
                result["seconds_" + kind + "_wall"] = round(time.perf_counter() - start, 2)
                on_result(task, result)
        finally:
            worker.stop()

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(max(1, min(jobs, len(tasks))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def all_types() -> list[str]:
    """Causal LMs, then the vision-language (image-text-to-text) models that are not also causal LMs."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    causal = list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return causal + [t for t in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if t not in causal]


def expected_layers(row: dict[str, Any]) -> Any:
    """The decoder layers that get a subgraph: all of them, less those the model itself skips in eager mode for a
    text batch (mllama's cross-attention layers without an image)."""
    if isinstance(row.get("layers_run"), int) and isinstance(row.get("decoder_layers"), int):
        return min(row["layers_run"], row["decoder_layers"])
    return row.get("decoder_layers")


def passed(row: dict[str, Any]) -> bool:
    return bool(
        row.get("emitted")
        and row.get("loaded")
        and row.get("equal")
        and row.get("target_subgraphs") == expected_layers(row)
    )


def sweep(
    types: list[str], jobs: int, timeout: float, keep: bool, build_only: bool = False, calibrate: bool = False
) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="seqgen-sweep-"))
    rows: dict[str, dict[str, Any]] = {arch: {"arch": arch} for arch in types}
    lock = threading.Lock()
    done = [0]

    def emitted(task: dict[str, Any], result: dict[str, Any]) -> None:
        with lock:
            rows[task["arch"]].update(result)
            done[0] += 1
            row = rows[task["arch"]]
            if row.get("emitted") or (build_only and row.get("built")):
                state = "emitted" if row.get("emitted") else "built"
            else:
                state = f"{row.get('stage')}: {row.get('error', '')[:90]}"
            print(f"[emit {done[0]:3d}/{len(types)}] {task['arch']:28s} {state}", flush=True)

    start = time.perf_counter()
    _run_phase("build" if build_only else "emit", [{"arch": a} for a in types], jobs, timeout, workdir, emitted)
    checks = [
        {
            "arch": a,
            "model_dir": r["model_dir"],
            "package_dir": r["package_dir"],
            "vocab_size": r["vocab_size"],
            "model_class": r["model_class"],
            "calibrate": calibrate,
        }
        for a, r in rows.items()
        if r.get("emitted")
    ]
    done[0] = 0

    def checked(task: dict[str, Any], result: dict[str, Any]) -> None:
        with lock:
            row = rows[task["arch"]]
            row.setdefault("loaded", False)
            row.update(result)
            done[0] += 1
            state = "PASS" if passed(row) else f"{row.get('stage')}: {row.get('error', '')[:90]}"
            if calibrate and passed(row):
                state += (
                    " | calibrated, round trip"
                    if calibrated(row)
                    else (f" | {row.get('cal_stage')}: {row.get('cal_error', '')[:90]}")
                )
            print(f"[check {done[0]:3d}/{len(checks)}] {task['arch']:28s} {state}", flush=True)

    if not build_only:
        _run_phase("check", checks, jobs, timeout, workdir, checked)
    for row in rows.values():
        row["pass"] = passed(row)
        if row.get("emitted") and row.get("equal") and not row["pass"] and "error" not in row:
            row["stage"] = "layers"
            row["error"] = (
                f"{row.get('target_subgraphs')} subgraphs with targets for {expected_layers(row)} decoder layers"
            )
    print(f"sweep took {time.perf_counter() - start:.0f}s (jobs={jobs}, timeout={timeout:.0f}s)")
    if keep:
        print(f"kept models and packages in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return [rows[a] for a in types]


# ---- reporting -----------------------------------------------------------------------------------------------


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


def is_causal(arch: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


KINDS = ("causal LM", "vision-language")


def summary(rows: list[dict[str, Any]]) -> list[tuple[str, list[tuple[int, str]]]]:
    """Per step, (count, percentage) for causal LMs, vision-language models and all of them."""
    groups = [[r for r in rows if is_causal(r["arch"])], [r for r in rows if not is_causal(r["arch"])], rows]
    with_calibration = any("cal_calibrated" in r for r in rows)
    steps = [_steps(group, with_calibration) for group in groups]
    return [(name, [group[i][1:] for group in steps]) for i, (name, _, _) in enumerate(steps[-1])]


def _steps(rows: list[dict[str, Any]], with_calibration: bool) -> list[tuple[str, int, str]]:
    counted = [r for r in rows if r.get("built")]
    total = len(counted)
    steps = [
        ("emitted", sum(1 for r in counted if r.get("emitted"))),
        ("loaded in a fresh process", sum(1 for r in counted if r.get("loaded"))),
        ("logits equal eager (max abs diff 0.0)", sum(1 for r in counted if r.get("equal"))),
        (
            "one subgraph per decoder layer",
            sum(1 for r in counted if r.get("emitted") and r.get("target_subgraphs") == expected_layers(r)),
        ),
        ("pass (all of the above)", sum(1 for r in counted if r["pass"])),
    ]
    if with_calibration:
        steps += [
            ("calibrated (GPTQ W4, per channel)", sum(1 for r in counted if r.get("cal_calibrated"))),
            ("saved compressed, reloaded, logits equal", sum(1 for r in counted if calibrated(r))),
            ("disk offload writes the same checkpoint", sum(1 for r in counted if r.get("cal_disk"))),
        ]
    return [("instantiable architectures", total, "100%" if total else "-")] + [
        (name, n, _pct(n, total)) for name, n in steps
    ]


def _cell(value: Any) -> str:
    if value is True:
        return "yes"
    if value is False or value is None:
        return "no" if value is False else ""
    return str(value).replace("|", "\\|")


def _note(row: dict[str, Any]) -> str:
    notes = []
    for note in row.get("notes", ()):
        if "use_cache=False" in note:
            notes.append("traced with use_cache=False")
        elif "skips" in note:
            skipped = row["decoder_layers"] - expected_layers(row)
            notes.append(f"the model skips {skipped} layer(s) for a text-only batch")
    if row.get("guards"):
        notes.append(f"{row['guards']} guard(s)")
    return "; ".join(notes)


def _calibration_cell(row: dict[str, Any]) -> str:
    if "cal_calibrated" not in row:
        return ""
    if calibrated(row):
        text = "yes" if row.get("cal_reload") == "packed" else "yes, decompressed on load"
    else:
        warned = "; loader drops dense tensors" if row.get("cal_loader_warning") else ""
        text = f"{row.get('cal_stage')}: {row.get('cal_error', '')[:160]}{warned}"
    if row.get("cal_disk") is False:
        text += f"; disk offload: {row.get('cal_disk_error', '')[:160]}"
    return re.sub(r"/\S*seqgen-sweep-[^/]+/", "", text)  # the run's temp directory


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    import torch
    import transformers

    counted = [r for r in rows if r.get("built")]
    apart = [r for r in rows if not r.get("built")]
    lines = [
        "# Architecture coverage",
        "",
        "Generated by `bench/arch_sweep.py --write-docs`; do not edit by hand. For every model type of transformers'",
        "`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (*causal LM*), and of `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`",
        "that is not also one (*vision-language*: built with `AutoModelForImageTextToText`, run on text only), a",
        "tiny random model (`seqgen.models.tiny_config`, fp32, seed 0) is saved, its package is emitted from the",
        "config on the meta device, and a fresh process loads both and compares",
        '`package.run(model, **batch)["logits"]` with `model(**batch).logits` for batches of shape '
        + " and ".join(f"{b}x{s}" for b, s in SHAPES)
        + " (`seqgen.verify.random_batch`, left padding in the first row).",
        "A row passes when the logits are equal (max abs diff 0.0) and there is one subgraph per decoder layer",
        "(`num_hidden_layers` of the text config, less the layers the model itself skips for a text-only batch;",
        "with the encoder's layers where the language model is an encoder-decoder, as Florence-2's is).",
        "",
        "Layers run without a KV cache (`use_cache=False`), except the families of `CACHE_NUMERICS`",
        "(`seqgen/trace/leaves.py`), whose numerics differ with a cache: each of their subgraphs builds its own.",
        "Notes: *traced with use_cache=False*: such a family's cache could not be built anew in each subgraph, so it",
        "runs without one. *guards*: control-flow decisions frozen at emit time and re-checked on every batch.",
        "",
        f"torch {torch.__version__.split('+')[0]}, transformers {transformers.__version__}; command: `{command}`",
        "",
        "| | " + " | ".join(f"{kind} | %" for kind in (*KINDS, "all")) + " |",
        "| --- |" + " ---: | ---: |" * (len(KINDS) + 1),
    ]
    lines += [
        "| " + name + " | " + " | ".join(f"{n} | {pct}" for n, pct in cells) + " |" for name, cells in summary(rows)
    ]
    with_calibration = any("cal_calibrated" in r for r in counted)
    if with_calibration:
        lines += [
            "",
            "With `--calibrate`, each passing model is then quantized by its package (GPTQ W4, one scale per channel,",
            "act-order, two batches, every token through every expert), saved in compressed-tensors format and loaded",
            "back with `from_pretrained`; *calibrated* says what happened: *yes* when the reloaded logits equal the",
            "in-memory quantized model's, *yes, decompressed on load* when transformers' default (packed) load fails",
            "on the model's own code but the checkpoint decompressed while loading is equal; otherwise the step that",
            "failed. *loader drops dense tensors*: seqgen's save warned that transformers 5.24 loses unquantized",
            "tensors that its compressed-tensors loader sends through the model's weight converters. *disk offload*:",
            "the same job with the weights left in the saved model's files did not write the same checkpoint.",
        ]
    lines += [
        "",
        "| architecture | class | emitted | loaded | equal | subgraphs with targets / decoder layers | error | notes |"
        + (" calibrated |" if with_calibration else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if with_calibration else ""),
    ]
    for r in counted:
        layers = f"{r.get('target_subgraphs', '-')} / {r.get('decoder_layers', '-')}"
        error = "" if r["pass"] else _cell(r.get("error", ""))
        lines.append(
            f"| {r['arch']} | {_cell(r.get('model_class'))} | {_cell(r.get('emitted'))} | {_cell(r.get('loaded'))} "
            f"| {_cell(r.get('equal'))} | {layers} | {error} | {_cell(_note(r))} |"
            + (f" {_cell(_calibration_cell(r))} |" if with_calibration else "")
        )
    if apart:
        lines += [
            "",
            "## Not instantiable as a tiny random model, or not runnable on text alone (not counted)",
            "",
            "*build*: the default config, shrunk, cannot be built or saved; *eager*: the model's own forward fails",
            "on a text-only batch, so there is nothing to compare with.",
            "",
            "| architecture | stage | error |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {r['arch']} | {r.get('stage', '')} | {_cell(r.get('error', ''))} |" for r in apart]
    return "\n".join(lines) + "\n"


def print_report(rows: list[dict[str, Any]]) -> None:
    counted = [r for r in rows if r.get("built")]
    failed = [r for r in counted if not r["pass"]]
    apart = [r for r in rows if not r.get("built")]
    print()
    print(f"{'':40s}" + "".join(f" {kind:>16s} {'%':>6s}" for kind in (*KINDS, "all")))
    for name, cells in summary(rows):
        print(f"{name:40s}" + "".join(f" {n:16d} {pct:>6s}" for n, pct in cells))
    nonzero = [r for r in counted if r.get("diffs") and any(v != 0.0 for v in r["diffs"].values())]
    if nonzero:
        print("\nnonzero logits differences:")
        for r in nonzero:
            print(f"  {r['arch']:28s} {r['diffs']}")
    if failed:
        print(f"\nfailures ({len(failed)}):")
        for r in failed:
            print(f"  {r['arch']:28s} [{r.get('stage')}] {r.get('error', '')[:200]}")
    cal_failed = [r for r in counted if r["pass"] and "cal_calibrated" in r and not calibrated(r)]
    if cal_failed:
        print(f"\ncalibration failures ({len(cal_failed)}):")
        for r in cal_failed:
            warned = (
                " (seqgen warned at save: transformers' loader drops dense tensors)"
                if r.get("cal_loader_warning")
                else ""
            )
            print(f"  {r['arch']:28s} [{r.get('cal_stage')}] {r.get('cal_error', '')[:200]}{warned}")
    disk_failed = [r for r in counted if r.get("cal_disk") is False]
    if disk_failed:
        print(f"\ndisk offload failures ({len(disk_failed)}):")
        for r in disk_failed:
            print(f"  {r['arch']:28s} {r.get('cal_disk_error', '')[:200]}")
    if apart:
        print(f"\nnot instantiable (not counted, {len(apart)}):")
        for r in apart:
            print(f"  {r['arch']:28s} {r.get('error', '')[:200]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", help="comma-separated model types (default: every causal-LM and vision-language type)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel workers per phase (default 2)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per architecture and phase")
    parser.add_argument("--write-docs", action="store_true", help=f"write the table to {DOCS.relative_to(REPO)}")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory with models and packages")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results path")
    parser.add_argument("--build-only", action="store_true", help="only build the tiny models and run them eagerly")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="also quantize each passing model with its package, save it compressed and reload it",
    )
    parser.add_argument("--worker", choices=["build", "emit", "check"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.workdir)
        return 0

    types = all_types()
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in types]
        if unknown:
            parser.error(f"not causal-LM model types: {', '.join(unknown)}")
        types = wanted
    rows = sweep(types, args.jobs, args.timeout, args.keep, args.build_only, args.calibrate)
    print_report(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/arch_sweep.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    args.output.write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=1, default=str) + "\n")
    print(f"\nwrote {args.output}")
    if args.write_docs:
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        DOCS.write_text(markdown(rows, command.strip()))
        print(f"wrote {DOCS}")
    counted = [r for r in rows if r.get("built")]
    return 0 if counted and all(r["pass"] for r in counted) else 1


if __name__ == "__main__":
    sys.exit(main())
