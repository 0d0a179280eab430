"""A transformers directory that the ecosystem opens: `save_hf(model, directory)`.

The directory holds what a Hugging Face model repository holds (``config.json``, ``model.safetensors``,
``preprocessor_config.json``, ``processor_config.json``, the tokenizer files, ``README.md``), so that
``transformers.pipeline("zero-shot-image-classification", model=directory)``, ``AutoModel``,
``AutoProcessor`` / ``CLIPProcessor`` and ``AutoTokenizer`` load it offline, and `vlm.load` reads it back.

What transformers computes differently from vlm, by design of its classes (measured in
tests/test_export_formats.py):

- Its default image processors (the torchvision backend) resize tensors, not PIL images: a few pixels come
  out one or two 8-bit levels apart. ``AutoImageProcessor.from_pretrained(directory, backend="pil")`` gives
  vlm's pixels exactly, except that its centre crop rounds the offset down where torchvision rounds half to
  even (an image whose resized long side exceeds the short side by 4k + 3 pixels is cropped one pixel off).
- transformers does not run open_clip's text cleaning (ftfy, HTML unescaping): non-ASCII text and text with
  HTML entities may tokenize differently. The cleaning vlm applies after those two steps (whitespace, lower
  case, SigLIP's punctuation removal) is written into the tokenizer's normalizer, so plain text gives vlm's ids.
- transformers always tokenizes SigLIP 2 text with its Siglip2Tokenizer, which lower-cases only: punctuation
  and runs of spaces, which open_clip's SigLIP cleaning removes, give other ids. SiglipTokenizer deletes "_"
  where open_clip puts a space. CLIP's vocabulary in a tower that reads its padding (id 0, the byte "!") makes
  "!" a special token in transformers.
- SigLIP 2's processor (NaFlex) keeps an image's aspect ratio; vlm squashes it to a square. Square images
  agree.
- The zero-shot pipeline pads SigLIP texts to 64 tokens: it runs SigLIP models that read 64.
"""

from __future__ import annotations

import functools
import json
import logging
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import CLIP_TOKENIZER, TextConfig, VisionConfig
from ..files import atomic_directory

if TYPE_CHECKING:
    from ..model import CLIP
    from ..model_card import ModelCard

__all__ = ["save_hf", "transformers_image_processor", "transformers_tokenizer"]

logger = logging.getLogger(__name__)

# model_type -> the processor class that pairs its image processor with its tokenizer.
_PROCESSORS = {"clip": "CLIPProcessor", "metaclip_2": "CLIPProcessor", "siglip": "SiglipProcessor", "siglip2": "Siglip2Processor"}
# PIL's resampling filters, as transformers' image processors number them.
_RESAMPLE = {"bilinear": 2, "bicubic": 3}
# transformers' names of CLIP's two special tokens (open_clip writes <start_of_text> and <end_of_text>).
_CLIP_SOT, _CLIP_EOT = "<|startoftext|>", "<|endoftext|>"


def save_hf(model: CLIP, directory: str | Path, *, card: ModelCard | None = None) -> Path:
    """Writes `model` as a transformers model directory (CLIPModel, MetaClip2Model, SiglipModel or
    Siglip2Model, whichever has its architecture) with its image processor, processor and tokenizer files and
    a model card; returns the directory.

    The directory is filled aside and renamed into place: a failure leaves `directory` as it was (absent, or
    the previous contents). ValueError when transformers has no class for the architecture (the message names
    the options), before anything is written. transformers has no shared towers: a ``share_transformer`` model
    is written with a copy per tower, and reads back unshared.
    """
    import transformers

    from ..convert import hf_family, to_hf
    from ..model_card import write_model_card

    family = hf_family(model.config)
    tokenizer = transformers_tokenizer(model)
    if family == "siglip2" and model.config.text.tokenizer_clean == "canonicalize":
        logger.warning(
            "transformers tokenizes SigLIP 2 text with its own Siglip2Tokenizer, which lower-cases but keeps the "
            "punctuation and runs of spaces open_clip and vlm remove: such texts get other ids in transformers (the "
            "zero-shot pipeline's default template ends with '.'; pass hypothesis_template='this is a photo of {}')"
        )
    if family in ("siglip", "siglip2") and model.config.text.context_length != 64:
        logger.warning(
            "transformers' zero-shot pipeline pads SigLIP texts to 64 tokens whatever the model reads; this model "
            "reads %d, so the pipeline cannot run it (the model and processor can)", model.config.text.context_length
        )
    image_processor = transformers_image_processor(model.config.vision, family)
    processor = getattr(transformers, _PROCESSORS[family])(image_processor=image_processor, tokenizer=tokenizer)
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        to_hf(model).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        # transformers 5 keeps the image processor inside processor_config.json; preprocessor_config.json is
        # where AutoImageProcessor, transformers 4 and vlm's reader look for it.
        image_processor.save_pretrained(tmp)
        _settle_tokenizer_config(tmp, model.config.text, tokenizer)
        if model.config.text.tokenizer == CLIP_TOKENIZER:
            _write_clip_vocabulary(tmp)
        write_model_card(tmp, model, fmt="transformers", card=card)
    logger.info("saved a transformers %s in %s", type(processor).__name__.replace("Processor", "Model"), directory)
    return directory


# ---- image processor ----------------------------------------------------------------------------------
def transformers_image_processor(vision: VisionConfig, family: str) -> Any:
    """The transformers image processor that prepares images as `vlm.image_transform` does for this tower:
    shortest side resized and centre-cropped (CLIPImageProcessor), squashed to a square (SiglipImageProcessor
    for the SigLIP family, CLIPImageProcessor with a height and width otherwise), or SigLIP 2's NaFlex patches
    (Siglip2ImageProcessor, with the tower's patch count)."""
    import transformers

    common = dict(image_mean=list(vision.image_mean), image_std=list(vision.image_std), resample=_RESAMPLE[vision.interpolation])
    if family == "siglip2":
        if vision.resize_mode != "squash":
            logger.warning(
                "SigLIP 2's image processor keeps the aspect ratio (NaFlex); this model resizes with %r, so "
                "non-square images are prepared differently in transformers", vision.resize_mode
            )
        return transformers.Siglip2ImageProcessor(patch_size=vision.patch_size, max_num_patches=vision.num_patches, **common)
    square = {"height": vision.image_size, "width": vision.image_size}
    if vision.resize_mode == "shortest":
        return transformers.CLIPImageProcessor(size={"shortest_edge": vision.image_size}, crop_size=square, **common)
    if family == "siglip":
        return transformers.SiglipImageProcessor(size=square, **common)
    return transformers.CLIPImageProcessor(size=square, crop_size=square, do_center_crop=False, **common)


# ---- tokenizer ----------------------------------------------------------------------------------------
def transformers_tokenizer(model: Any) -> Any:
    """A transformers tokenizer that gives the ids `vlm.get_tokenizer(model)` gives for plain text, with
    ``model_max_length`` = the context length: a CLIPTokenizer over CLIP's byte-pair vocabulary, or the
    model's Hugging Face tokenizer with open_clip's cleaning in its normalizer."""
    from transformers import AutoTokenizer

    from ..tokenizer import get_tokenizer

    text: TextConfig = model.config.text
    if text.tokenizer == CLIP_TOKENIZER:
        return _clip_tokenizer(text)
    files = get_tokenizer(model).files
    tokenizer = AutoTokenizer.from_pretrained(str(files[0].parent), local_files_only=True)
    tokenizer.model_max_length = text.context_length
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.normalizer = _with_cleaning(backend.normalizer, text.tokenizer_clean)
    elif text.tokenizer_clean != "canonicalize" or type(tokenizer).__name__ != "SiglipTokenizer":
        # A Python tokenizer has no normalizer to carry the cleaning; SiglipTokenizer canonicalises by itself.
        logger.warning(
            "transformers' %s does not clean text as open_clip's %r does; texts that cleaning changes tokenize "
            "differently in transformers", type(tokenizer).__name__, text.tokenizer_clean
        )
    return tokenizer


def _settle_tokenizer_config(directory: Path, text: TextConfig, tokenizer: Any) -> None:
    """Two settings in tokenizer_config.json that transformers reads when it loads the tokenizer:

    - a bidirectional text tower attends to its padding (SigLIP, as big_vision and open_clip run it), so the
      tokenizer returns no attention_mask: the pipeline passes every tokenizer output to the model, and a mask
      would hide the padding from it;
    - transformers' generic class for a tokenizer in tokenizer.json (not CLIP's): a model's own class
      (T5Tokenizer, GemmaTokenizer) rebuilds its normalizer when loaded, dropping the cleaning
      `_with_cleaning` put there. (transformers ignores the class for SigLIP 2 and builds its Siglip2Tokenizer,
      which lower-cases and keeps punctuation.)
    """
    path = directory / "tokenizer_config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    if not text.causal:
        settings["model_input_names"] = ["input_ids"]
    if text.tokenizer != CLIP_TOKENIZER and hasattr(tokenizer, "backend_tokenizer"):
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _with_cleaning(normalizer: Any, clean: str) -> Any:
    """`normalizer` preceded by open_clip's cleaning `clean` after ftfy and HTML unescaping (which
    `tokenizers` cannot express; they change only non-ASCII text and text holding '&')."""
    from tokenizers import Regex, normalizers

    steps = []
    if clean == "canonicalize":
        punctuation = "[" + "".join("\\" + c for c in string.punctuation) + "]"
        steps += [normalizers.Replace("_", " "), normalizers.Replace(Regex(punctuation), "")]
    if clean in ("canonicalize", "lower"):
        steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if normalizer is None:
        return normalizers.Sequence(steps)
    # A tokenizer saved here before (a model re-saved after vlm.load) has the cleaning already.
    ours = json.loads(normalizers.Sequence(steps).__getstate__())["normalizers"]
    current = json.loads(normalizer.__getstate__())
    if current.get("type") == "Sequence" and current["normalizers"][: len(ours)] == ours:
        return normalizer
    return normalizers.Sequence([*steps, normalizer])


def _clip_tokenizer(text: TextConfig) -> Any:
    """transformers' CLIPTokenizer over open_clip's vocabulary. It pads with <|endoftext|>, as transformers' CLIP
    repositories do, where the tower cannot see padding (causal, pooled at end-of-text); a tower that reads its
    padding gets vlm's and open_clip's id 0."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocabulary()
    pad = _CLIP_EOT
    if not (text.causal and text.pool == "eot"):
        # Id 0 is the byte "!", so it becomes a special token: a "!" in a text then tokenizes as padding.
        pad = "!"
        logger.warning(
            "this text tower reads padding (causal=%s, pool=%r), which vlm fills with id 0; transformers' "
            "CLIPTokenizer can only pad with it by making '!' a special token, so texts containing '!' "
            "tokenize differently in transformers", text.causal, text.pool
        )
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad, model_max_length=text.context_length
    )


@functools.lru_cache(maxsize=1)
def _clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """open_clip's byte-pair vocabulary as transformers' CLIP repositories hold it: the same ids, with the
    special tokens spelt <|startoftext|> and <|endoftext|>, and its 48,894 merges."""
    # vlm.tokenizer is where the vocabulary file is found and read; its own readers keep the ids identical.
    from ..tokenizer import EOT_TOKEN, SOT_TOKEN, _backend, _read_merges, _vocab_path

    names = {SOT_TOKEN: _CLIP_SOT, EOT_TOKEN: _CLIP_EOT}
    vocab = {names.get(token, token): i for i, token in enumerate(_backend().id_to_token)}
    return vocab, tuple(_read_merges(_vocab_path()))


def _write_clip_vocabulary(directory: Path) -> None:
    """vocab.json and merges.txt beside tokenizer.json, as openai/clip-vit-base-patch32 has them (older
    transformers and other tools read these two)."""
    vocab, merges = _clip_vocabulary()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
