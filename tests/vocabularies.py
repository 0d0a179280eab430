"""Small tokenizer vocabularies trained at test time from local text, written in the file layouts of the
Hugging Face repositories the model families use (no vocabulary can be downloaded here).

`build_layouts` trains them (sentencepiece: T5's unigram, Gemma's byte-fallback BPE, XLM-R's unigram;
tokenizers: a BERT WordPiece) and writes one folder per layout: SigLIP as timm and google ship it, SigLIP 2
likewise, XLM-V (MetaCLIP 2 worldwide) and bert-base-uncased (CLIPA).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path


def added_token(content: str, **flags) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True, **flags}


def _write_json(folder: Path, name: str, value: dict) -> None:
    (folder / name).write_text(json.dumps(value, indent=2), encoding="utf-8")


def _train_sentencepiece(lines: list[str], **options) -> bytes:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, minloglevel=2, num_threads=1, **options
    )
    return model.getvalue()


def _tokenizer_json(cls, vocabulary: Path, name: str, **kwargs) -> str:
    """The tokenizer.json transformers converts from a sentencepiece model (what a fast tokenizer saves)."""
    folder = vocabulary.parent / f"{cls.__name__}-convert"
    folder.mkdir(exist_ok=True)
    shutil.copy(vocabulary, folder / name)
    return cls.from_pretrained(str(folder), **kwargs).backend_tokenizer.to_str()


def _siglip_google(folder: Path, t5: Path) -> None:
    shutil.copy(t5, folder / "spiece.model")
    eos, unk = added_token("</s>", lstrip=True, rstrip=True), added_token("<unk>", lstrip=True, rstrip=True)
    _write_json(folder, "tokenizer_config.json", {
        "added_tokens_decoder": {"1": eos, "2": unk}, "additional_special_tokens": [], "do_lower_case": True,
        "eos_token": "</s>", "model_max_length": 64, "pad_token": "</s>", "processor_class": "SiglipProcessor",
        "sp_model_kwargs": {}, "tokenizer_class": "SiglipTokenizer", "unk_token": "<unk>"})
    _write_json(folder, "special_tokens_map.json", {"eos_token": eos, "pad_token": eos, "unk_token": unk})
    text_config = {"vocab_size": 1000, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 1}
    _write_json(folder, "config.json", {"model_type": "siglip", "text_config": text_config})


def _siglip_timm(folder: Path, t5: Path) -> None:
    """open_clip's `SigLipTokenizer` saved a T5TokenizerFast (extra_ids=0, pad id 1) made from a temporary
    spiece.model, so the repo has tokenizer.json and no spiece.model."""
    from transformers import T5Tokenizer

    (folder / "tokenizer.json").write_text(_tokenizer_json(T5Tokenizer, t5, "spiece.model", extra_ids=0, legacy=False))
    _write_json(folder, "tokenizer_config.json", {
        "added_tokens_decoder": {"0": added_token("<pad>"), "1": added_token("</s>"), "2": added_token("<unk>")},
        "additional_special_tokens": [], "eos_token": "</s>", "extra_ids": 0, "legacy": False,
        "model_max_length": 1000000000000000019884624838656, "pad_token": "</s>", "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>"})
    _write_json(folder, "special_tokens_map.json", {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"})
    # timm's model config: no model_type, so it cannot steer AutoTokenizer.
    _write_json(folder, "config.json", {"architecture": "vit_base_patch16_siglip_224", "num_classes": 0})


def _gemma_tokenizer_json(gemma: Path) -> str:
    """GemmaTokenizerFast(add_bos_token=False, add_eos_token=True) saves "$A <eos>" as its post-processor,
    the only place transformers 5 reads those two flags from when a tokenizer.json is present."""
    from tokenizers import Tokenizer, processors
    from transformers import GemmaTokenizer

    backend = Tokenizer.from_str(_tokenizer_json(GemmaTokenizer, gemma, "tokenizer.model"))
    backend.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    return backend.to_str()


def _gemma_settings(folder: Path, **extra) -> None:
    specials = {"0": added_token("<pad>"), "1": added_token("<eos>"), "2": added_token("<bos>"), "3": added_token("<unk>"),
                "4": added_token("<mask>", special=False)}
    _write_json(folder, "tokenizer_config.json", {
        "add_bos_token": False, "add_eos_token": True, "added_tokens_decoder": specials, "bos_token": "<bos>",
        "eos_token": "<eos>", "pad_token": "<pad>", "padding_side": "right", "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>", **extra})
    _write_json(folder, "special_tokens_map.json", {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                                                    "unk_token": "<unk>"})


def _siglip2_timm(folder: Path, gemma: Path) -> None:
    (folder / "tokenizer.json").write_text(_gemma_tokenizer_json(gemma))
    _gemma_settings(folder, model_max_length=1000000000000000019884624838656)
    _write_json(folder, "config.json", {"architecture": "vit_base_patch16_siglip_224", "num_classes": 0})


def _siglip2_google(folder: Path, gemma: Path) -> None:
    (folder / "tokenizer.json").write_text(_gemma_tokenizer_json(gemma))
    shutil.copy(gemma, folder / "tokenizer.model")
    _gemma_settings(folder, model_max_length=64, processor_class="Siglip2Processor")
    text_config = {"vocab_size": 1200, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
    _write_json(folder, "config.json", {"model_type": "siglip2", "text_config": text_config})


def _xlm_v(folder: Path, xlmr: Path) -> None:
    shutil.copy(xlmr, folder / "sentencepiece.bpe.model")
    _write_json(folder, "tokenizer_config.json", {"model_max_length": 512, "tokenizer_class": "XLMRobertaTokenizer"})
    _write_json(folder, "special_tokens_map.json", {
        "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": added_token("<mask>", lstrip=True),
        "pad_token": "<pad>", "sep_token": "</s>", "unk_token": "<unk>"})
    _write_json(folder, "config.json", {"model_type": "xlm-roberta", "vocab_size": 1002, "pad_token_id": 1,
                                        "bos_token_id": 0, "eos_token_id": 2})


def _bert(folder: Path, lines: list[str]) -> None:
    """bert-base-uncased: [PAD] 0, [unused0-98], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then WordPieces;
    its tokenizer_config.json names no class, config.json's model_type does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    specials = ["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = normalizers.BertNormalizer(lowercase=True)
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trained.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=1500, special_tokens=specials[-4:]))
    pieces = sorted(trained.get_vocab().items(), key=lambda item: item[1])
    (folder / "vocab.txt").write_text("\n".join(specials + [p for p, _ in pieces if p not in specials]) + "\n")
    _write_json(folder, "tokenizer_config.json", {"do_lower_case": True, "model_max_length": 512})
    _write_json(folder, "config.json", {"model_type": "bert", "vocab_size": 1600, "pad_token_id": 0})
    (folder / "tokenizer.json").write_text(BertTokenizer.from_pretrained(str(folder)).backend_tokenizer.to_str())


def build_layouts(root: Path, doc_corpus: list[str]) -> dict[str, Path]:
    """Each layout's folder. The vocabularies learn from a fifth of the docstring lines, so that the rest holds
    words they lack."""
    lines = doc_corpus[::5]
    t5, gemma, xlmr = root / "t5.model", root / "gemma.model", root / "xlmr.model"
    # T5 (SigLIP): unigram, pad 0, eos 1, unk 2, no bos, nmt_nfkc normalisation.
    t5.write_bytes(
        _train_sentencepiece(lines, vocab_size=1000, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    )
    # Gemma (SigLIP 2): byte-fallback BPE, pad 0, eos 1, bos 2, unk 3, no normalisation, no dummy prefix.
    gemma.write_bytes(_train_sentencepiece(
        lines, vocab_size=1200, model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", user_defined_symbols=["<mask>"],
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True))
    # XLM-R (XLM-V): unigram, unk 0, <s> 1, </s> 2; transformers moves them behind <pad> (fairseq's order).
    xlmr.write_bytes(
        _train_sentencepiece(lines, vocab_size=1000, model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    )
    builders = {
        "siglip-timm": lambda folder: _siglip_timm(folder, t5),
        "siglip2-timm": lambda folder: _siglip2_timm(folder, gemma),
        "xlm-v": lambda folder: _xlm_v(folder, xlmr),
        "bert": lambda folder: _bert(folder, lines),
        "siglip-google": lambda folder: _siglip_google(folder, t5),
        "siglip2-google": lambda folder: _siglip2_google(folder, gemma),
    }
    folders = {}
    for name, build in builders.items():
        folders[name] = root / name
        folders[name].mkdir()
        build(folders[name])
    return folders
