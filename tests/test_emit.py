"""Emit, then load in a fresh process, then run: logits equal eager exactly."""

from __future__ import annotations

import ast
import operator
from pathlib import Path

import pytest
import torch
from conftest import CORE_ARCHS, run_fresh, save_tiny
from transformers import LlamaForCausalLM

import seqgen
from seqgen import TraceFailure
from seqgen.emitter import EmitOptions, emit_model
from seqgen.models import TINY_SEED, meta_model, tiny_config
from seqgen.trace.passes import remove_identities
from seqgen.verify import random_batch


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, dict]]:
    root = tmp_path_factory.mktemp("archs")
    found = {}
    for arch in CORE_ARCHS:
        model_dir, model = save_tiny(arch, root)
        package_dir = root / arch / "package"
        result = emit_model(meta_model(model.config), package_dir)
        found[arch] = (model_dir, package_dir, result.index)
    return found


def test_fresh_process_reproduces_eager(emitted: dict[str, tuple[Path, Path, dict]]) -> None:
    args = [str(p) for model_dir, package_dir, _ in emitted.values() for p in (model_dir, package_dir)]
    report = run_fresh("run_packages.py", *args)
    assert report["tracer_modules"] == [], "loading a package must not import the tracer or the emitter"
    for arch, (_, package_dir, _) in emitted.items():
        for shape, diff in report["diffs"][str(package_dir)].items():
            assert diff == 0.0, f"{arch}: logits differ from eager by {diff} for batch {shape}"


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_one_subgraph_per_decoder_layer(emitted: dict[str, tuple[Path, Path, dict]], arch: str) -> None:
    _, package_dir, index = emitted[arch]
    targets = [t for sg in index["subgraphs"] for t in sg["targets"]]
    assert len(targets) == 2 and all(len(sg["targets"]) <= 1 for sg in index["subgraphs"])
    assert index["subgraphs"][0]["targets"] == [] and index["subgraphs"][-1]["targets"] == []
    assert index["subgraphs"][-1]["outputs"] == ["logits"]
    for sg in index["subgraphs"]:
        source = (package_dir / sg["file"]).read_text()
        tree = ast.parse(source)
        forward = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
        assert [a.arg for a in forward.args.kwonlyargs] == list(sg["inputs"])
        assert "exec(" not in source and "getattr(self" not in source


def test_emit_is_deterministic(tmp_path: Path) -> None:
    config = meta_model("tiny:qwen3").config
    first = emit_model(meta_model(config), tmp_path / "a").path
    second = emit_model(meta_model(config), tmp_path / "b").path
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs between two emits"


def test_targets_per_subgraph_groups_layers(tmp_path: Path) -> None:
    model = meta_model("tiny:llama")
    model.config.num_hidden_layers = 2
    index = emit_model(model, tmp_path / "p", EmitOptions(targets_per_subgraph=2)).index
    assert [sg["targets"] for sg in index["subgraphs"]] == [[], ["model.layers.0", "model.layers.1"], []]


def test_targets_by_regex(tmp_path: Path) -> None:
    index = emit_model(meta_model("tiny:llama"), tmp_path / "p", EmitOptions(targets=(r"model\.layers\.1",))).index
    assert [sg["targets"] for sg in index["subgraphs"]] == [[], ["model.layers.1"], []]


def test_emit_70b_config_on_meta_without_weights(tmp_path: Path) -> None:
    """An 80-layer 70B-class config emits on the meta device: no weights, one subgraph per layer."""
    from seqgen.models import tiny_config

    config = tiny_config(
        "llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
    )
    index = emit_model(meta_model(config), tmp_path / "p").index
    assert len(index["subgraphs"]) == 82
    assert index["subgraphs"][80]["targets"] == ["model.layers.79"]


class ScaledLlama(LlamaForCausalLM):
    """Makes a constant tensor in forward, as some modeling code does (`epsilon_tensor = torch.tensor(1e-5)`)."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        output = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logit_scale = torch.tensor([0.5, 0.25]).sum()
        output.logits = output.logits * logit_scale
        return output


def test_constant_tensor_made_in_forward_is_written_as_a_literal(tmp_path: Path) -> None:
    with torch.device("meta"):
        skeleton = ScaledLlama(tiny_config("llama")).eval()
    result = emit_model(skeleton, tmp_path / "p")
    tail = (result.path / result.index["subgraphs"][-1]["file"]).read_text()
    # computed eagerly while tracing (no traced value is involved), so the literal holds the result, in the one
    # subgraph that uses it: nothing is passed between subgraphs for it
    assert "logit_scale = torch.tensor(0.75, dtype=torch.float32)" in tail
    assert all("logit_scale" not in sg["inputs"] for sg in result.index["subgraphs"])
    torch.manual_seed(TINY_SEED)
    model = ScaledLlama(tiny_config("llama")).eval()
    batch = random_batch(model.config.vocab_size, 2, 9, seed=0)
    with torch.no_grad():
        expected = model(**batch).logits
    assert torch.equal(seqgen.load(result.path).run(model, **batch)["logits"], expected)


class OffsetLlama(LlamaForCausalLM):
    """Adds a constant too large to write out as a literal."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        output = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        output.logits = output.logits + torch.zeros(self.config.vocab_size)
        return output


def test_large_constant_tensor_is_refused_with_its_line(tmp_path: Path) -> None:
    with torch.device("meta"):
        skeleton = OffsetLlama(tiny_config("llama")).eval()
    with pytest.raises(TraceFailure) as caught:
        emit_model(skeleton, tmp_path / "p")
    message = str(caught.value)
    assert "test_emit.py:" in message and "torch.zeros(self.config.vocab_size)" in message
    assert "shape (99,)" in message and "--ignore NAME" in message
    assert not (tmp_path / "p").exists()


def _module_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls of ``model.<path>(...)``: the generated code's module calls."""
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("model.") and "." in ast.unparse(node.func):
            calls.append(node)
    return calls


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_generated_code_has_no_no_op_lines_and_no_positional_none(
    emitted: dict[str, tuple[Path, Path, dict]], arch: str
) -> None:
    _, package_dir, index = emitted[arch]
    for sg in index["subgraphs"]:
        source = (package_dir / sg["file"]).read_text()
        assert " + 0\n" not in source and "[:, 0:, :]" not in source and "[:, :, :]" not in source, sg["file"]
        for call in _module_calls(ast.parse(source)):
            positional_none = [a for a in call.args if isinstance(a, ast.Constant) and a.value is None]
            assert not positional_none, f"{sg['file']}: {ast.unparse(call)[:80]} passes None positionally"


def test_values_take_the_source_names_not_op_names(emitted: dict[str, tuple[Path, Path, dict]]) -> None:
    """GPT-2's ``hidden_states = inputs_embeds + position_embeds.to(inputs_embeds.device)`` is one line, as in the
    source, instead of a value named ``to``; so are its guard's condition and ``output_shape``."""
    _, package_dir, index = emitted["gpt2"]
    head = (package_dir / index["subgraphs"][0]["file"]).read_text()
    assigned = {
        target.id
        for node in ast.walk(ast.parse(head))
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert not assigned & {"to", "lt", "getitem", "add", "size", "arange"}, assigned
    assert "hidden_states = inputs_embeds + position_embeds.to(inputs_embeds.device)" in head
    assert "output_shape = (-1,) + input_shape[1:] + (hidden_states.size(-1),)" in head
    assert "guard(\n        attention_mask.ndim < 4,\n" in head


def test_identity_pass_removes_only_provable_identities() -> None:
    """``x + 0`` is an identity on integers only (a float's -0.0 becomes 0.0, a bool tensor becomes int64), and a
    slice is one only when it is full on every dimension."""
    graph = torch.fx.Graph()
    meta = {}

    def value(name: str, tensor: torch.Tensor) -> torch.fx.Node:
        node = graph.call_function(torch.empty_like, (graph.placeholder(f"{name}_in"),))
        meta[node] = tensor
        return node

    ints, floats, bools, full, part = (
        value(name, t)
        for name, t in [
            ("ints", torch.arange(3)),
            ("floats", torch.zeros(3)),
            ("bools", torch.ones(3, dtype=torch.bool)),
            ("full", torch.zeros(2, 3, 4)),
            ("part", torch.zeros(2, 3, 4)),
        ]
    )
    kept = [
        graph.call_function(operator.add, (floats, 0)),
        graph.call_function(operator.add, (bools, 0)),
        graph.call_function(operator.getitem, (part, (slice(None), slice(1, None), slice(None)))),
    ]
    removed = [
        graph.call_function(operator.add, (0, ints)),
        graph.call_function(operator.getitem, (full, (slice(None), slice(0, None), slice(None)))),
    ]
    graph.output((*kept, *removed))
    remove_identities(graph, meta.get)
    remaining = set(graph.nodes)
    assert all(node in remaining for node in kept) and not any(node in remaining for node in removed)
    assert graph.output_node().args[0][3:] == (ints, full)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_a_subgraph_takes_and_returns_only_what_is_used(emitted: dict[str, tuple[Path, Path, dict]], arch: str) -> None:
    """A value passes through no subgraph that does not read it: each input is read by the file's code, and each
    output is read by a later subgraph or is a model output."""
    _, package_dir, index = emitted[arch]
    for position, sg in enumerate(index["subgraphs"]):
        tree = ast.parse((package_dir / sg["file"]).read_text())
        forward = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
        read = {n.id for n in ast.walk(forward) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert set(sg["inputs"]) <= read, f"{sg['file']} takes {set(sg['inputs']) - read} without reading them"
        later = {name for other in index["subgraphs"][position + 1 :] for name in other["inputs"]}
        assert set(sg["outputs"]) <= later | set(index["outputs"]), sg["file"]
