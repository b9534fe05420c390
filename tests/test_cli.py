"""The CLI: user errors exit non-zero with one message and no traceback; nothing is half written; help and version
import no torch; options are the library's choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import REPO

import seqgen
from seqgen.choices import DType, Offload, SaveFormat
from seqgen.cli import cli
from seqgen.errors import SeqgenError
from seqgen.job import CalibrationJob


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, cwd=REPO)


def test_emit_refuses_a_non_package_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_cli("emit", "tiny:llama", str(tmp_path))
    assert proc.returncode == 1
    assert "not a seqgen package" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_existing_package_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    runner = CliRunner()
    assert runner.invoke(cli, ["emit", "tiny:llama", str(out)]).exit_code == 0
    again = runner.invoke(cli, ["emit", "tiny:llama", str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    assert runner.invoke(cli, ["emit", "tiny:llama", str(out), "--force"]).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"], "no temp directories are left behind"


def test_unknown_targets_and_ignore_are_named(tmp_path: Path) -> None:
    proc = run_cli("emit", "tiny:llama", str(tmp_path / "a"), "--targets", "NoSuchLayer")
    assert proc.returncode == 1 and "NoSuchLayer" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("emit", "tiny:llama", str(tmp_path / "b"), "--ignore", "no_such_helper")
    assert proc.returncode == 1 and "no_such_helper" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_sample_shape_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["emit", "tiny:llama", str(tmp_path / "a"), "--sample-shape", "2x64"])
    assert result.exit_code == 2 and "BATCH,SEQ" in result.output


def test_show_and_verify(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    runner = CliRunner()
    assert runner.invoke(cli, ["emit", "tiny:gpt2", str(out)]).exit_code == 0
    shown = runner.invoke(cli, ["show", str(out)])
    assert shown.exit_code == 0 and "transformer.h.0" in shown.output and "guard 0" in shown.output
    verified = runner.invoke(cli, ["verify", str(out), "--model", "tiny:gpt2"])
    assert verified.exit_code == 0 and "max abs diff 0.0" in verified.output


def test_model_that_is_not_a_generative_decoder_is_named(tmp_path: Path) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model("vit", hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    proc = run_cli("emit", str(tmp_path), str(tmp_path / "pkg"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "model type 'vit' (ViTConfig)" in proc.stderr and "AutoModelForImageTextToText" in proc.stderr
    assert not (tmp_path / "pkg").exists()


def test_text_config_no_auto_class_maps_loads_through_its_architecture(tmp_path: Path) -> None:
    """Mllama's causal LM saves its text config, which no auto class maps: config.json's architectures names it."""
    import torch
    from transformers import AutoConfig

    from seqgen.models import auto_class, load_model, meta_model, tiny_model

    model = tiny_model("mllama")
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "mllama_text_model" and auto_class(config).__name__ == "MllamaForCausalLM"
    assert type(meta_model(str(tmp_path))) is type(model)
    loaded = load_model(str(tmp_path))
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_multimodal_checkpoint_of_a_causal_lm_type_keeps_its_vision_tower(tmp_path: Path) -> None:
    """Qwen3.5's checkpoint is multimodal, but AutoModelForCausalLM maps its type to the text-only class, which would
    drop the vision tower from the saved model: the class config.json names loads it whole."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from seqgen.models import auto_class, load_model, tiny_config

    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(tiny_config("qwen3_5")).save_pretrained(tmp_path)
    assert auto_class(AutoConfig.from_pretrained(tmp_path)).__name__ == "Qwen3_5ForConditionalGeneration"
    loaded = load_model(str(tmp_path))
    assert any(name.startswith("model.visual.") for name, _ in loaded.named_parameters())
    assert auto_class(tiny_config("qwen3_5")).__name__ == "AutoModelForCausalLM"  # no architectures: the mapping


# ----------------------------------------------------------------------------------------------- start-up and options

_IMPORTS_AFTER = """
import sys
from click.testing import CliRunner
from seqgen.cli import cli
result = CliRunner().invoke(cli, sys.argv[1:])
assert result.exit_code == 0, result.output
print(sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["emit", "--help"], ["cache", "--help"]])
def test_help_and_version_import_no_torch(args: list[str]) -> None:
    """In a fresh interpreter (this one has imported torch already): each command imports what it needs when it
    runs, so help and version stay light."""
    proc = subprocess.run([sys.executable, "-c", _IMPORTS_AFTER, *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", args


def test_lazy_public_api_resolves_on_first_use() -> None:
    code = (
        "import sys, seqgen\n"
        "assert 'torch' not in sys.modules\n"
        "from seqgen import *\n"
        "from seqgen.package import load\n"
        "from seqgen.emitter import emit\n"
        "assert seqgen.load is load and seqgen.emit is emit and set(seqgen.__all__) <= set(dir(seqgen))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(AttributeError, match="module 'seqgen' has no attribute 'emitt'"):
        seqgen.emitt  # noqa: B018


def calibrate_job(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Result, CalibrationJob | None]:
    """Run `seqgen calibrate ARGS` up to the job it builds (run_job records it and stops)."""
    import seqgen.job

    jobs: list[CalibrationJob] = []

    def record(job: CalibrationJob) -> None:
        jobs.append(job)
        raise SeqgenError("stopped by the test")

    monkeypatch.setattr(seqgen.job, "run_job", record)
    result = CliRunner().invoke(cli, ["calibrate", "--model", "m", "--save", "out", *args])
    return result, jobs[0] if jobs else None


def test_calibrate_options_reach_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    result, job = calibrate_job(
        monkeypatch, "--group-size", "-1", "--offload", "disk", "--save-format", "fake", "--dtype", "bfloat16"
    )
    assert result.exit_code == 1 and "stopped by the test" in result.output
    assert job.options.scheme.group_size is None
    assert (job.offload, job.save_format, job.dtype) == (Offload.DISK, SaveFormat.FAKE, DType.BFLOAT16)
    assert job.overwrite is False and calibrate_job(monkeypatch, "--overwrite")[1].overwrite is True


def test_group_size_zero_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    result, job = calibrate_job(monkeypatch, "--group-size", "0")
    assert result.exit_code == 2 and job is None
    assert "Invalid value for '--group-size': 0 is not a group size: use a positive number of columns, or -1" in (
        result.output
    )


def test_choices_come_from_the_library() -> None:
    help_text = CliRunner().invoke(cli, ["calibrate", "--help"], terminal_width=200).output
    assert f"--offload [{'|'.join(Offload.values())}]" in help_text
    assert f"--save-format [{'|'.join(SaveFormat.values())}]" in help_text
    assert f"--dtype [{'|'.join(DType.values())}]" in help_text


def test_algorithm_choices_include_user_registered_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from seqgen.algorithms import ALGORITHMS, RTN

    class Mine(RTN):
        name = "test-mine"

    monkeypatch.setitem(ALGORITHMS, Mine.name, Mine)  # as register_algorithm does, for this test only
    help_text = CliRunner().invoke(cli, ["calibrate", "--help"], terminal_width=200).output
    assert "--algorithm [gptq|rtn|test-mine]" in help_text
    result, job = calibrate_job(monkeypatch, "--algorithm", "test-mine")
    assert job.options.algorithm == "test-mine"
    result, job = calibrate_job(monkeypatch, "--algorithm", "awq")
    assert result.exit_code == 2 and job is None
    assert "Invalid value for '--algorithm': 'awq' is not one of 'gptq', 'rtn', 'test-mine'." in result.output
