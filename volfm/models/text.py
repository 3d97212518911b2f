"""Report text encoder: a tokenizer + a Hugging Face model, pooled to one vector per text.

    enc = build_text_encoder(texts=train_reports)            # offline default: small BERT, WordPiece
    enc = build_text_encoder("/models/Clinical-Longformer")  # a model folder on disk (no downloads)
    z = enc(["liver and biliary: hepatomegaly.", ...])       # (B, enc.hidden_size)
    enc.save_pretrained("out/text"); enc = TextEncoder.from_pretrained("out/text")

Hugging Face models and tokenizers are only ever read from local folders (``local_files_only=True``);
a folder can be made on a machine with network with ``AutoModel.from_pretrained(hub_id).save_pretrained(dir)``
and ``AutoTokenizer.from_pretrained(hub_id).save_pretrained(dir)``.
"""
from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers.models import WordPiece
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    PreTrainedTokenizerFast,
)

from volfm import VolfmError

POOLINGS = ("cls", "mean")
GLOBAL_ATTENTION = ("first", "none")  # Longformer: global attention on the first token (volfm's default) or none (Merlin)
# NLTK's wordpunct_tokenize pattern, which Merlin's sanitize_report joins with spaces
_WORDPUNCT = re.compile(r"\w+|[^\w\s]+", re.UNICODE | re.MULTILINE | re.DOTALL)


def merlin_sanitize(text: str) -> str:
    """Merlin's report normalisation: lower case, then NLTK's ``wordpunct_tokenize`` tokens joined by spaces
    ("Liver: Normal." -> "liver : normal .")."""
    return " ".join(_WORDPUNCT.findall(str(text).lower()))


NORMALIZERS = {"none": str, "merlin": merlin_sanitize}
SETTINGS_FILE = "volfm_text_encoder.json"
# Models whose position ids start after the padding index (RoBERTa-style): usable length = max_pos - pad - 1.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "longformer", "camembert", "data2vec-text", "roberta-prelayernorm",
                     "xmod", "mpnet", "ibert"}


def max_text_length(config) -> int | None:
    """Longest token sequence the model's position embeddings allow (None if it has no such limit)."""
    n = getattr(config, "max_position_embeddings", None)
    if n is None:
        return None
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        n -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return int(n)


class TextEncoder(nn.Module):
    """``forward(texts) -> (B, hidden_size)``: normalise the texts (``normalize``: "none", or "merlin": lower case
    and NLTK word/punctuation tokens joined by spaces, as Merlin), tokenize (pad, truncate to ``max_length``) and
    pool the model's last hidden state: ``"cls"`` = first token, ``"mean"`` = attention-mask-weighted mean.
    ``global_attention`` (Longformer only): "first" puts global attention on the first token (as Longformer
    classifiers do), "none" passes no global attention mask (as Merlin's text tower)."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 512, pooling: str = "cls",
                 global_attention: str = "first", normalize: str = "none"):
        super().__init__()
        if pooling not in POOLINGS:
            raise VolfmError(f"unknown text pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if global_attention not in GLOBAL_ATTENTION:
            raise VolfmError(f"unknown global_attention {global_attention!r}; choose one of "
                             f"{', '.join(GLOBAL_ATTENTION)}")
        if normalize not in NORMALIZERS:
            raise VolfmError(f"unknown text normalize {normalize!r}; choose one of {', '.join(NORMALIZERS)}")
        max_length = int(max_length)
        if max_length < 2:
            raise VolfmError(f"max_length must be at least 2 tokens ([CLS] ... [SEP]), got {max_length}")
        limit = max_text_length(model.config)
        if limit is not None and max_length > limit:
            raise VolfmError(f"max_length={max_length} is longer than the text model allows ({limit} tokens: "
                             f"max_position_embeddings={model.config.max_position_embeddings}); "
                             f"use max_length <= {limit} or a long-document model (e.g. a Longformer)")
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None and len(tokenizer) > emb.num_embeddings:
            raise VolfmError(f"the tokenizer has {len(tokenizer)} tokens but the text model's embedding table only "
                             f"{emb.num_embeddings}; use the tokenizer the model was trained with")
        if tokenizer.pad_token_id is None:
            raise VolfmError("the tokenizer has no padding token; set tokenizer.pad_token before building the encoder")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pooling = pooling
        self.global_attention = global_attention
        self.normalize = normalize

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: str | Sequence[str | None], device: torch.device | str | None = None) -> dict:
        """``{"input_ids", "attention_mask"}`` (B, L) long tensors, L <= max_length (e.g. in a data loader)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = [NORMALIZERS[self.normalize]("" if t is None else str(t)) for t in texts]
        if not texts:
            raise VolfmError("TextEncoder got an empty list of texts")
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return out if device is None else {k: v.to(device) for k, v in out.items()}

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled embedding (B, hidden_size) of already tokenized texts."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {}
        if getattr(self.model.config, "model_type", None) == "longformer" and self.global_attention == "first":
            glob = torch.zeros_like(attention_mask)
            glob[:, 0] = 1  # global attention on the first token, as Longformer classifiers do
            kwargs["global_attention_mask"] = glob
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        w = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)

    def forward(self, texts: str | Sequence[str | None]) -> torch.Tensor:
        return self.encode_tokens(**self.tokenize(texts, device=self.device))

    # ------------------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write model (safetensors + config.json), tokenizer and the encoder settings to ``directory``;
        the model and tokenizer also load with ``AutoModel``/``AutoTokenizer.from_pretrained(dir)``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        settings = {"max_length": self.max_length, "pooling": self.pooling,
                    "global_attention": self.global_attention, "normalize": self.normalize}
        if _has_no_pooler(self.model):
            settings["model_kwargs"] = {"add_pooling_layer": False}
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides) -> TextEncoder:
        """Load what :meth:`save_pretrained` wrote (settings can be overridden: ``max_length``, ``pooling``,
        ``global_attention``, ``normalize``)."""
        settings_path = Path(directory).expanduser() / SETTINGS_FILE
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        settings.update(overrides)
        return build_text_encoder(str(directory), **settings)

    def to_spec(self) -> dict:
        """JSON-able description (model config, tokenizer JSON, settings) to rebuild the encoder without
        files, e.g. in a Lightning checkpoint; the weights travel in the state dict."""

        return {"config": self.model.config.to_dict(), "tokenizer": tokenizer_to_json(self.tokenizer),
                "max_length": self.max_length, "pooling": self.pooling, "pooler": not _has_no_pooler(self.model),
                "global_attention": self.global_attention, "normalize": self.normalize}

    @classmethod
    def from_spec(cls, spec: dict) -> TextEncoder:
        """Rebuild (randomly initialised) from :meth:`to_spec`; then load the state dict."""


        cfg = dict(spec["config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = AutoModel.from_config(config)
        if not spec.get("pooler", True) and getattr(model, "pooler", None) is not None:
            model.pooler = None
        return cls(model, tokenizer_from_json(spec["tokenizer"]), max_length=spec["max_length"],
                   pooling=spec["pooling"], global_attention=spec.get("global_attention", "first"),
                   normalize=spec.get("normalize", "none"))


def _has_no_pooler(model: nn.Module) -> bool:
    """A BERT-like model built without (or stripped of) its pooler layer, which TextEncoder never uses."""
    return hasattr(model, "pooler") and model.pooler is None


# Files of which a saved tokenizer has at least one (transformers 5 would otherwise build an empty-vocabulary
# tokenizer from config.json alone, silently).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json")


def _missing_model_error(path: str, why: str) -> VolfmError:
    return VolfmError(
        f"text model path {path!r} {why}. It must be a local folder with config.json, the weights and the "
        f"tokenizer files: volfm never downloads models. On a machine with network, run "
        f"AutoModel.from_pretrained(ID).save_pretrained(DIR) and AutoTokenizer.from_pretrained(ID)"
        f".save_pretrained(DIR), copy DIR here and pass its path (or leave model_path unset to train a small "
        f"BERT with a WordPiece tokenizer on the cohort's reports)")


def _load_local(model_path: str, tokenizer, model_kwargs: dict | None = None):

    path = Path(model_path).expanduser()
    if not path.exists():
        raise _missing_model_error(model_path, "does not exist")
    if not path.is_dir():
        raise _missing_model_error(model_path, "is not a folder")
    if not (path / "config.json").is_file():
        raise _missing_model_error(model_path, "has no config.json")
    try:
        model, info = AutoModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                                **(model_kwargs or {}))
    except (OSError, ValueError, KeyError) as e:
        raise VolfmError(f"could not load the text model from {model_path!r}: {e}") from e
    missing = set(info.get("missing_keys", ()))
    if missing and all(k.startswith("pooler.") for k in missing) and getattr(model, "pooler", None) is not None:
        model.pooler = None  # saved without a pooler: drop the randomly initialised one (unused, DDP-unfriendly)
    if tokenizer is None:
        if not any((path / name).is_file() for name in _TOKENIZER_FILES) and not any(path.glob("*.model")):
            raise VolfmError(f"{model_path!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the "
                             f"model's tokenizer there with tokenizer.save_pretrained(DIR) or pass tokenizer=")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise VolfmError(f"could not load a tokenizer from {model_path!r} ({e}); save the model's tokenizer "
                             f"there with tokenizer.save_pretrained(DIR) or pass tokenizer=") from e
    return model, tokenizer


def build_text_encoder(model_path: str | Path | None = None, *, texts: Sequence[str | None] | None = None,
                       max_length: int = 512, pooling: str = "cls", vocab_size: int = 8000,
                       hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
                       intermediate_size: int = 1024, tokenizer=None, dropout: float = 0.1,
                       model_kwargs: dict | None = None, global_attention: str = "first",
                       normalize: str = "none") -> TextEncoder:
    """Text encoder from a local model folder, or (``model_path=None``) the offline default.

    model_path: a folder written by ``save_pretrained`` (e.g. a clinical BERT or Longformer); loaded
        with ``local_files_only=True``, never downloaded; its tokenizer is loaded from the same folder
        unless ``tokenizer`` is given; ``model_kwargs`` go to ``AutoModel.from_pretrained``. The size
        arguments are ignored. ``global_attention`` and ``normalize``: see :class:`TextEncoder`.
    Default: a randomly initialised ``BertModel`` (``hidden_size``, ``num_layers``, ``num_heads``,
        ``intermediate_size``, no pooler layer, ``max_position_embeddings = max(512, max_length)``)
        with ``tokenizer``, or a WordPiece tokenizer of ``vocab_size`` trained on ``texts`` (the cohort's
        training reports). Seed with ``torch.manual_seed`` for a reproducible initialisation.
    """
    if model_path is not None:
        model, tokenizer = _load_local(str(model_path), tokenizer, model_kwargs)
        return TextEncoder(model, tokenizer, max_length=max_length, pooling=pooling,
                           global_attention=global_attention, normalize=normalize)
    if tokenizer is None:
        if texts is None:
            raise VolfmError("build_text_encoder needs model_path (a local model folder), texts (training "
                             "reports to train a tokenizer on) or tokenizer")
        tokenizer = train_wordpiece_tokenizer(texts, vocab_size=vocab_size, model_max_length=max_length)
    if hidden_size % num_heads:
        raise VolfmError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=max(512, int(max_length)), pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return TextEncoder(BertModel(config, add_pooling_layer=False), tokenizer, max_length=max_length,
                       pooling=pooling, global_attention=global_attention, normalize=normalize)


# ------------------------------------------------------------------------------------------- tokenizers
SPECIAL_TOKENS: dict[str, str] = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                                  "sep_token": "[SEP]", "mask_token": "[MASK]"}
_JSON_FORMAT = "volfm.tokenizer/1"


def _wrap(backend, model_max_length: int | None = None, **special):
    """A transformers fast tokenizer around a ``tokenizers.Tokenizer`` (copied)."""
    kwargs = {k: v for k, v in special.items() if v is not None}
    if model_max_length is not None:
        kwargs["model_max_length"] = int(model_max_length)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def train_wordpiece_tokenizer(texts: Iterable[str | None], vocab_size: int = 8000, min_frequency: int = 2,
                              lowercase: bool = True, model_max_length: int = 512):
    """Train a BERT-style WordPiece tokenizer on report texts (offline) -> ``PreTrainedTokenizerFast``.

    BertNormalizer (``lowercase``), BertPreTokenizer, WordPiece with "##" continuation, special tokens
    [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, "[CLS] $A [SEP]" post-processing. Printable ASCII
    characters are always in the alphabet, so digits and punctuation never become [UNK].
    ``save_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir, local_files_only=True)`` round-trip.
    """
    corpus = [str(t) for t in (texts or []) if t is not None and str(t).strip()]
    if not corpus:
        raise VolfmError("cannot train a tokenizer: no non-empty report texts were given; "
                         "check the cohort table's 'report' column (or pass a pretrained model folder)")
    specials = list(SPECIAL_TOKENS.values())
    if int(vocab_size) <= len(specials):
        raise VolfmError(f"vocab_size must be larger than the {len(specials)} special tokens, got {vocab_size}")
    tok = Tokenizer(WordPiece(unk_token=SPECIAL_TOKENS["unk_token"], continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    alphabet = sorted(set((string.ascii_lowercase if lowercase else string.ascii_letters) + string.digits
                          + string.punctuation))
    trainer = trainers.WordPieceTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                        special_tokens=specials, initial_alphabet=alphabet,
                                        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return _wrap(tok, model_max_length=model_max_length, **SPECIAL_TOKENS)


def tokenizer_to_json(tokenizer) -> str:
    """A fast tokenizer as one JSON string: the ``tokenizers`` backend, its special tokens and
    ``model_max_length`` / padding and truncation sides. Inverse: :func:`tokenizer_from_json`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VolfmError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; "
                         "only fast tokenizers can be written as JSON")
    special = {k: str(getattr(tokenizer, k)) for k in ("pad_token", "unk_token", "cls_token", "sep_token",
                                                          "mask_token", "bos_token", "eos_token")
               if getattr(tokenizer, k, None) is not None}
    max_len = getattr(tokenizer, "model_max_length", None)
    return json.dumps({
        "format": _JSON_FORMAT,
        "tokenizer": json.loads(backend.to_str()),
        "special_tokens": special,
        "model_max_length": int(max_len) if max_len is not None and max_len < 10 ** 12 else None,
        "padding_side": getattr(tokenizer, "padding_side", "right"),
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
    })


def tokenizer_from_json(s: str):
    """Rebuild a ``PreTrainedTokenizerFast`` from :func:`tokenizer_to_json` (also accepts a bare
    ``tokenizers`` JSON, i.e. the content of a tokenizer.json)."""
    try:
        obj = json.loads(s)
    except (TypeError, json.JSONDecodeError) as e:
        raise VolfmError(f"tokenizer JSON could not be parsed: {e}") from e
    if not isinstance(obj, dict):
        raise VolfmError("tokenizer JSON must be an object")
    if obj.get("format") != _JSON_FORMAT:
        obj = {"tokenizer": obj, "special_tokens": {}}
    backend = Tokenizer.from_str(json.dumps(obj["tokenizer"]))
    tok = _wrap(backend, obj.get("model_max_length"), **obj.get("special_tokens", {}))
    tok.padding_side = obj.get("padding_side", "right")
    tok.truncation_side = obj.get("truncation_side", "right")
    return tok
