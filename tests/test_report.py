"""The calibration report: GPTQ's relative error against the layer's real outputs, the report `--save` writes, the
`seqgen report` table, and the HTML page in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from seqgen.algorithms import QuantScheme, get_algorithm
from seqgen.cli import cli
from seqgen.models import tiny_model
from seqgen.outputs import foreign_files
from seqgen.report import REPORT_NAME, layer_errors, read_report
from seqgen.runtime.compress import compress_linears

REPO = Path(__file__).resolve().parents[1]
# The browser test's screenshot, kept after the run (build/ is ignored by git; `make clean` removes it).
ARTIFACTS = REPO / "build" / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
LAYERS = 3
SAMPLES, SEQ_LEN = 4, 32


def _inputs(tokens: int, features: int) -> torch.Tensor:
    """Correlated inputs with a few large channels, as a transformer's are."""
    torch.manual_seed(0)
    x = torch.randn(tokens, features) @ (torch.eye(features) + 0.3 * torch.randn(features, features))
    x[:, :3] *= 8
    return x


def _output_error(weight: torch.Tensor, dequantized: torch.Tensor, x: torch.Tensor) -> float:
    """The oracle: ``||(W - Q) X||^2 / ||W X||^2`` from the layer's outputs on ``x``, in float64."""
    x, weight, dequantized = x.double(), weight.double(), dequantized.double()
    return float(((weight - dequantized) @ x.T).square().sum() / (weight @ x.T).square().sum())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_relative_error_is_the_error_of_the_layers_outputs(act_order: bool) -> None:
    """Without dampening GPTQ's Hessian is exactly ``2/N X^T X``, so the error it measures is the outputs' error."""
    x = _inputs(400, 64)
    algorithm = get_algorithm("gptq", QuantScheme(bits=4, group_size=16, act_order=act_order, dampening=0.0))
    linears = {name: torch.nn.Linear(64, rows, bias=False) for name, rows in (("q", 48), ("k", 16), ("v", 16))}
    originals = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    stats = algorithm.new_statistics(64, torch.device("cpu"))
    stats.update(x)
    # q, k and v share their statistics: quantized in one call on their stacked rows, then split
    quantized = compress_linears(algorithm, linears, dict.fromkeys(linears, stats))
    for name, weight in originals.items():
        expected = _output_error(weight, linears[name].weight.detach(), x)
        assert 0 < expected < 0.1
        assert quantized[name].relative_error() == pytest.approx(expected, rel=1e-3), name


def test_rtn_measures_no_error() -> None:
    linears = {"fc": torch.nn.Linear(64, 8)}
    quantized = compress_linears(get_algorithm("rtn", QuantScheme()), linears, {"fc": None})
    assert quantized["fc"].relative_error() is None


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Path) -> tuple[Path, torch.nn.Module]:
    """A tiny Llama calibrated with GPTQ through the CLI, saved with its report; and the model it started from."""
    root = tmp_path_factory.mktemp("report")
    model = tiny_model(
        "llama", vocab_size=49152, hidden_size=64, intermediate_size=128, head_dim=16, num_hidden_layers=LAYERS
    )
    model.save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(smollm2_tokenizer).save_pretrained(root / "model")
    args = ["--group-size", "32", "--num-samples", str(SAMPLES), "--seq-len", str(SEQ_LEN), "--batch-size", "2"]
    result = CliRunner().invoke(cli, ["calibrate", "--model", str(root / "model"), *args, "--save", str(root / "q")])
    assert result.exit_code == 0, result.output
    return root / "q", model


def test_save_writes_the_report(saved: tuple[Path, torch.nn.Module]) -> None:
    directory, model = saved
    report = json.loads((directory / REPORT_NAME).read_text())
    linears = [
        name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith("model.layers")
    ]
    assert sorted(m["name"] for m in report["modules"]) == sorted(linears)
    for module in report["modules"]:
        assert module["scheme"] == "W4A16 g32 sym act-order"
        assert module["tokens"] == SAMPLES * SEQ_LEN  # every packed sample is full: no padding left out
        assert 0 < module["relative_error"] < 1
    assert [sg["targets"] for sg in report["subgraphs"]][: LAYERS + 1] == [[]] + [
        [f"model.layers.{i}"] for i in range(LAYERS)
    ]
    layers = report["subgraphs"][1:]
    assert all({"onload", "calibrate", "compress", "offload"} <= set(sg["seconds"]) for sg in layers)
    assert all(sg["rss_peak_bytes"] > 0 for sg in report["subgraphs"])
    assert report["totals"]["linears"] == len(linears)
    assert report["options"]["options"]["scheme"]["group_size"] == 32
    assert set(report["versions"]) >= {"seqgen", "torch", "transformers", "python"}


def test_report_prints_the_worst_modules_and_writes_the_page(saved: tuple[Path, torch.nn.Module]) -> None:
    directory, _ = saved
    result = CliRunner().invoke(cli, ["report", str(directory), "--worst", "3"])
    assert result.exit_code == 0, result.output
    errors = sorted((m["relative_error"], m["name"]) for m in read_report(directory)["modules"])
    table = result.output.splitlines()[1:6]
    assert table[0].split() == ["module", "scheme", "tokens", "rel.", "error"]
    assert [line.split()[0] for line in table[2:]] == [name for _, name in errors[::-1][:3]]
    page = (directory / "seqgen_report.html").read_text()
    assert foreign_files(directory) == []  # the page is seqgen's own file: --overwrite may still replace the save
    assert page.count('class="bar') == LAYERS
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_report_without_a_report_names_the_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{tmp_path} has no {REPORT_NAME}" in result.output and "seqgen calibrate --save" in result.output


def _browser_missing() -> str | None:
    """Why the browser test cannot run here, with how to make it run; None if it can."""
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        return "headless Chromium is not installed: `apt-get install -y chromium` (Debian; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: `pip install -e '.[dev]'` (make setup installs it)"
    return None


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_report_page_renders_in_chromium(saved: tuple[Path, torch.nn.Module]) -> None:
    """The page in a real browser: one bar per layer and a segment per phase and subgraph, laid out with a height,
    no console errors, and no request but the page itself. The screenshot is kept in build/test-artifacts/."""
    from playwright.sync_api import sync_playwright

    directory, _ = saved
    result = CliRunner().invoke(cli, ["report", str(directory)])
    assert result.exit_code == 0, result.output
    page_path = directory / "seqgen_report.html"
    report = read_report(directory)
    problems: list[str] = []
    requests: list[str] = []
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            bars = page.locator('svg[aria-label="relative error per layer"] rect.bar')
            assert bars.count() == len(layer_errors(report)) == LAYERS
            heights = [bars.nth(i).bounding_box()["height"] for i in range(bars.count())]
            assert max(heights) > 100 and min(heights) > 0  # the tallest bar spans most of the chart
            worst = max(range(LAYERS), key=lambda i: layer_errors(report)[i][1])
            assert heights[worst] == max(heights)
            segments = page.locator('svg[aria-label="seconds per phase and subgraph"] rect.segment')
            phases = {p for sg in report["subgraphs"] for p in sg["seconds"]}
            assert segments.count() == len(report["subgraphs"]) * len(phases)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report_page.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert requests == [page_path.as_uri()]
    assert (ARTIFACTS / "report_page.png").stat().st_size > 10_000
