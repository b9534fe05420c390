"""``--trust-remote-code``: a model with its own configuration and modeling code (``auto_map``) traces, emits,
verifies against its eager self and calibrates; its code counts in the fingerprint; without the flag the error names
it. The model's files are written here: a Llama whose MLP scales its output by ``mlp_scale`` (0.5), so a run of the
built-in Llama instead of the model's own code would not reproduce it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from seqgen.cli import cli
from seqgen.models import tiny_model

REPO = Path(__file__).resolve().parents[1]
CALIBRATE = ["--bits", "4", "--group-size", "32", "--num-samples", "2", "--seq-len", "16", "--batch-size", "2"]

CONFIGURATION = """
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"

    def __init__(self, mlp_scale=1.0, **kwargs):
        self.mlp_scale = mlp_scale
        super().__init__(**kwargs)
"""

MODELING = """
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomMLP(LlamaMLP):
    def __init__(self, config):
        super().__init__(config)
        self.scale = config.mlp_scale

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * self.scale


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = TinyCustomMLP(config)
        self.post_init()
"""


def write_custom_model(path: Path, tokenizer: Path) -> Path:
    """The custom model's checkpoint: a tiny Llama's weights (the custom model's parameters have the same names)
    under a config.json of the custom model type that maps to the files written beside it."""
    tiny_model("llama", vocab_size=49152, hidden_size=64, intermediate_size=128, head_dim=16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="tiny_custom",
        architectures=["TinyCustomForCausalLM"],
        mlp_scale=0.5,
        auto_map={
            "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
        },
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "configuration_tiny_custom.py").write_text(CONFIGURATION)
    (path / "modeling_tiny_custom.py").write_text(MODELING)
    return path


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Path) -> Path:
    return write_custom_model(tmp_path_factory.mktemp("remote") / "tiny_custom", smollm2_tokenizer)


def seqgen(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, with transformers' copies of remote code under ``tmp_path`` (it reads
    ``HF_MODULES_CACHE`` when it is imported)."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def emitted(custom: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The custom model's package, emitted with the flag; and the scratch directory of the processes."""
    scratch = tmp_path_factory.mktemp("remote-run")
    done = seqgen(scratch, "emit", str(custom), str(scratch / "package"), "--trust-remote-code")
    assert done.returncode == 0, done.stderr
    return scratch / "package", scratch


@pytest.mark.parametrize("command", ["emit", "calibrate"])
def test_without_the_flag_the_error_names_it(custom: Path, tmp_path: Path, command: str) -> None:
    """Refused before transformers imports any of the model's code (so in this process: it writes nothing)."""
    args = [str(custom), str(tmp_path / "out")] if command == "emit" else ["--model", str(custom), *CALIBRATE]
    if command == "calibrate":
        args += ["--save", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, [command, *args])
    assert result.exit_code == 1, result.output
    assert "its own modeling code" in result.output and "--trust-remote-code" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_trusted_remote_code_emits_verifies_and_calibrates(custom: Path, emitted: tuple[Path, Path]) -> None:
    package, scratch = emitted
    index = json.loads((package / "index.json").read_text())
    assert index["model_class"] == "TinyCustomForCausalLM"
    sources = index["fingerprint"]["source"]
    assert any(name.endswith(".modeling_tiny_custom") for name in sources), sources
    assert any(name.endswith(".configuration_tiny_custom") for name in sources), sources
    # the package against the eager custom model: bit for bit
    done = seqgen(scratch, "verify", str(package), "--model", str(custom), "--trust-remote-code")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reproduces TinyCustomForCausalLM exactly" in done.stdout
    done = seqgen(
        scratch, "calibrate", str(package), "--model", str(custom), *CALIBRATE, "--trust-remote-code",
        "--save", str(scratch / "quantized"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((scratch / "quantized" / "config.json").read_text())["quantization_config"]


def test_the_fingerprint_hashes_the_remote_sources(custom: Path, emitted: tuple[Path, Path]) -> None:
    """An edit to the model's own code is a new package (a new cache key), as an edit to transformers' would be."""
    package, scratch = emitted
    edited = scratch / "tiny_custom_edited"
    shutil.copytree(custom, edited)
    with (edited / "configuration_tiny_custom.py").open("a") as f:
        f.write("# an edit that changes nothing the trace sees\n")
    done = seqgen(scratch, "emit", str(edited), str(scratch / "package-edited"), "--trust-remote-code")
    assert done.returncode == 0, done.stderr
    fingerprints = [
        json.loads((p / "index.json").read_text())["fingerprint"] for p in (package, scratch / "package-edited")
    ]
    assert fingerprints[0]["digest"] != fingerprints[1]["digest"]
    sources = [{name.rpartition(".")[2]: digest for name, digest in f["source"].items()} for f in fingerprints]
    assert sources[0]["configuration_tiny_custom"] != sources[1]["configuration_tiny_custom"]
    assert sources[0]["modeling_tiny_custom"] == sources[1]["modeling_tiny_custom"]
