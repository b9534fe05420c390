"""Vision-language models calibrated on chats with images: tiny LLaVA and Qwen2-VL checkpoints with processors, images
the test draws, and the CLI from the .jsonl to the saved checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from seqgen.cli import cli
from seqgen.models import tiny_config

PIL = pytest.importorskip("PIL.Image", reason="image calibration needs pillow: pip install 'seqgen[vision]'")

# Image parts become the model's placeholders; text parts are written as they are.
_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
)


def _llava(tokenizer, directory: Path) -> None:
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = tiny_config("llava", image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    config.text_config.vocab_size = len(tokenizer)
    config.vision_config.image_size = 28  # 2 x 2 patches of 14
    torch.manual_seed(0)
    LlavaForConditionalGeneration(type(config).from_dict(config.to_dict())).save_pretrained(directory)
    size = {"shortest_edge": 28}
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_TEMPLATE.replace("IMAGE", "<image>"),
    ).save_pretrained(directory)


def _qwen2_vl(tokenizer, directory: Path) -> None:
    """A checkpoint without a processor: Qwen2-VL's processor needs torchvision, even for images (its video
    processor), and this venv has none. :func:`_qwen2_vl_batches` renders the chats as the processor would."""
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIAL})
    ids = dict(zip(_QWEN_SPECIAL, tokenizer.convert_tokens_to_ids(_QWEN_SPECIAL), strict=True))
    config = tiny_config(
        "qwen2_vl",
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.rope_parameters["mrope_section"] = [1, 2, 1]  # the rotary half of a head of 8
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(type(config).from_dict(config.to_dict())).save_pretrained(directory)
    tokenizer.chat_template = _TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
    tokenizer.save_pretrained(directory)


_QWEN_SPECIAL = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
_QWEN_PIXELS = 56 * 56  # 4 x 4 patches of 14, merged 2 x 2 into 4 tokens


def _qwen2_vl_batches(directory: Path, chats: Path) -> list[dict[str, torch.Tensor]]:
    """What Qwen2VLProcessor.apply_chat_template gives: pixel patches, grid sizes, and each image's placeholder
    repeated once per merged patch."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from seqgen.images import load_image_chats

    tokenizer = AutoTokenizer.from_pretrained(directory)
    images = Qwen2VLImageProcessorPil(min_pixels=_QWEN_PIXELS, max_pixels=_QWEN_PIXELS)
    batches = []
    for chat in load_image_chats(chats).chats:
        paths = [
            part["path"]
            for m in chat
            if isinstance(m["content"], list)
            for part in m["content"]
            if part["type"] == "image"
        ]
        pixels = images(images=[PIL.open(p).convert("RGB") for p in paths], return_tensors="pt")
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        for grid in pixels["image_grid_thw"]:
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // 4), 1)
        input_ids = tokenizer(text.replace("<|placeholder|>", "<|image_pad|>"), return_tensors="pt")["input_ids"]
        image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "pixel_values": pixels["pixel_values"],
                "image_grid_thw": pixels["image_grid_thw"],
                "mm_token_type_ids": (input_ids == image_token).long(),
            }
        )
    return batches


def _chats(directory: Path, count: int) -> Path:
    """``count`` chats, each with one image of random pixels in another size (the processor resizes them)."""
    import numpy as np

    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        PIL.fromarray(rng.integers(0, 255, (40 + 8 * i, 50, 3), dtype=np.uint8)).save(directory / f"image{i}.png")
        question = [
            {"type": "image", "path": f"image{i}.png"},
            {"type": "text", "text": "What is this?" + " Look closely." * i},
        ]
        answer = [{"type": "text", "text": "Noise, in many colours."}]
        lines.append(
            json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        )
    (directory / "chats.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "chats.jsonl"


@pytest.fixture(params=["llava", "qwen2_vl"])
def vision_checkpoint(request, tmp_path: Path, smollm2_tokenizer: Path) -> tuple[str, Path, Path]:
    from transformers import AutoTokenizer

    directory = tmp_path / request.param
    {"llava": _llava, "qwen2_vl": _qwen2_vl}[request.param](AutoTokenizer.from_pretrained(smollm2_tokenizer), directory)
    return request.param, directory, _chats(tmp_path, 3)


def _batches(arch: str, directory: Path, chats: Path) -> list[dict[str, torch.Tensor]]:
    from seqgen.images import image_batches, load_image_chats, load_processor

    if arch == "qwen2_vl":
        return _qwen2_vl_batches(directory, chats)
    return image_batches(load_image_chats(chats), load_processor(directory), 3)


def _tower(arch: str) -> str:
    return "visual" if arch == "qwen2_vl" else "vision_tower"


def test_package_traced_with_images_equals_eager(vision_checkpoint) -> None:
    """The package the image data gets runs every chat (other sizes of image, other lengths) as eager does."""
    import seqgen
    from seqgen.emitter import emit_model
    from seqgen.images import emit_options
    from seqgen.models import load_model, meta_model

    arch, directory, chats = vision_checkpoint
    model = load_model(str(directory))
    batches = _batches(arch, directory, chats)
    assert all("pixel_values" in batch for batch in batches)
    assert len({batch["input_ids"].shape[1] for batch in batches}) == 3  # the chats differ in length
    meta = meta_model(model.config)
    index = emit_model(meta, directory.parent / "package", emit_options(meta, batches)).index
    head = (directory.parent / "package" / index["subgraphs"][0]["file"]).read_text()
    assert f"model.model.{_tower(arch)}(" in head
    package = seqgen.load(directory.parent / "package")
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(package.run(model, **batch)["logits"], model(**batch).logits)


@pytest.mark.parametrize("quantize_vision", [False, True])
def test_calibrate_on_images(vision_checkpoint, quantize_vision: bool) -> None:
    """Calibration on the chats quantizes the language model's linears; the vision tower's only when asked."""
    import seqgen
    from seqgen.algorithms import QuantScheme
    from seqgen.emitter import emit_model
    from seqgen.images import emit_options
    from seqgen.models import load_model, meta_model
    from seqgen.runtime import CalibrationOptions, calibrate
    from seqgen.trace.targets import find_targets, tower_targets

    arch, directory, chats = vision_checkpoint
    model = load_model(str(directory))
    batches = _batches(arch, directory, chats)
    meta = meta_model(model.config)
    targets = [*tower_targets(meta), *find_targets(meta)] if quantize_vision else None
    emit_model(meta, directory.parent / "package", emit_options(meta, batches, targets))
    package = seqgen.load(directory.parent / "package")
    options = CalibrationOptions(algorithm="gptq", scheme=QuantScheme(bits=8, group_size=None))
    quantized = set(calibrate(model, package, batches, options).quantized)
    assert len({name for name in quantized if ".language_model." in name}) == 2 * 7  # q, k, v, o, gate, up, down
    assert bool({name for name in quantized if f".{_tower(arch)}." in name}) == quantize_vision
    assert not any("multi_modal_projector" in name for name in quantized)  # (qwen2-vl's merger is in its tower)


@pytest.mark.parametrize("quantize_vision", [False, True])
def test_cli_calibrates_llava_on_images(tmp_path: Path, smollm2_tokenizer: Path, quantize_vision: bool) -> None:
    """The whole job from the .jsonl: the checkpoint's processor renders the chats; the saved checkpoint packs the
    vision tower's linears only with --quantize-vision."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    _llava(AutoTokenizer.from_pretrained(smollm2_tokenizer), tmp_path / "llava")
    save = tmp_path / "quantized"
    args = ["calibrate", "--model", str(tmp_path / "llava"), "--dataset", str(_chats(tmp_path, 2)), "--bits", "8"]
    args += ["--num-samples", "2", "--group-size", "-1", "--save", str(save)]
    result = CliRunner().invoke(cli, args + (["--quantize-vision"] if quantize_vision else []))
    assert result.exit_code == 0, result.output
    names = set()
    for file in save.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names.update(f.keys())
    packed = {name.removesuffix(".weight_packed") for name in names if name.endswith(".weight_packed")}
    # the names the checkpoint stores (transformers maps LLaVA's module names back to the hub layout's)
    assert len({name for name in packed if name.startswith("language_model.")}) == 2 * 7
    assert bool({name for name in packed if name.startswith("vision_tower.")}) == quantize_vision


def test_quantize_vision_needs_image_data(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["calibrate", "--model", "smollm2-135m", "--quantize-vision", "--save", str(tmp_path / "out")]
    )
    assert result.exit_code != 0
    assert "--quantize-vision calibrates the vision tower" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_image_is_named(tmp_path: Path) -> None:
    from seqgen.errors import SeqgenError
    from seqgen.images import load_image_chats

    record = {"messages": [{"role": "user", "content": [{"type": "image", "path": "gone.png"}]}]}
    (tmp_path / "chats.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(SeqgenError, match=r"chats.jsonl:1: image .*gone.png does not exist"):
        load_image_chats(tmp_path / "chats.jsonl")
