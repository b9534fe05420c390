"""The CLI: user errors exit non-zero with one message and no traceback; nothing is half written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from conftest import REPO

from seqgen.cli import cli


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
