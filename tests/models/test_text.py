"""TextEncoder: offline default BERT, local folders only, pooling, truncation, persistence."""
import json
import socket
import time

import pytest
import torch
from transformers import LongformerConfig, LongformerModel

from volfm import VolfmError
from volfm.models.text import TextEncoder, build_text_encoder, train_wordpiece_tokenizer
from volfm.synth.ct import make_ct_case

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def reports():
    return [make_ct_case(seed, shape=(16, 16, 16))["report"] for seed in range(20)]


@pytest.fixture(scope="module")
def tokenizer(reports):
    return train_wordpiece_tokenizer(reports, vocab_size=1000)


@pytest.fixture()
def encoder(tokenizer):
    torch.manual_seed(0)
    return build_text_encoder(tokenizer=tokenizer, max_length=64, **SMALL).eval()


def test_default_build_shape(reports):
    torch.manual_seed(0)
    enc = build_text_encoder(texts=reports, max_length=128, vocab_size=1000, **SMALL).eval()
    assert enc.hidden_size == 32 and enc.max_length == 128 and enc.pooling == "cls"
    assert enc.model.config.max_position_embeddings >= 128 and enc.model.config.vocab_size == len(enc.tokenizer)
    with torch.no_grad():
        z = enc(reports[:3])
    assert z.shape == (3, 32) and torch.isfinite(z).all()
    assert not torch.allclose(z[0], z[1])
    with torch.no_grad():
        assert enc(reports[0]).shape == (1, 32)  # a single string is a batch of one
    with pytest.raises(VolfmError, match="needs model_path"):
        build_text_encoder()


def test_cls_and_mean_pooling_differ(encoder):
    texts = ["liver and biliary: hepatomegaly.", "spleen: no splenomegaly."]
    mean_enc = TextEncoder(encoder.model, encoder.tokenizer, max_length=64, pooling="mean")
    with torch.no_grad():
        cls_z, mean_z = encoder(texts), mean_enc(texts)
        hidden = encoder.model(**encoder.tokenize(texts[:1])).last_hidden_state[0]
    assert not torch.allclose(cls_z, mean_z, atol=1e-3)
    torch.testing.assert_close(cls_z[0], hidden[0])
    torch.testing.assert_close(mean_z[0], hidden.mean(0))
    with pytest.raises(VolfmError, match="unknown text pooling"):
        TextEncoder(encoder.model, encoder.tokenizer, pooling="max")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooling_ignores_padding(encoder, reports, pooling):
    enc = TextEncoder(encoder.model, encoder.tokenizer, max_length=64, pooling=pooling).eval()
    short, long = "spleen: the spleen is enlarged.", reports[3]
    batch = enc.tokenize([short, long])
    assert (batch["attention_mask"][0] == 0).any()  # the short text really is padded
    with torch.no_grad():
        alone, padded = enc([short])[0], enc([short, long])[0]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0)


def test_truncation_at_max_length(encoder, reports):
    long_text = " ".join(reports[:3])
    tokens = encoder.tokenize([long_text, "liver"])
    assert tokens["input_ids"].shape == (2, 64) and tokens["attention_mask"][0].all()
    assert tokens["input_ids"][0, 0] == encoder.tokenizer.cls_token_id
    assert tokens["input_ids"][0, -1] == encoder.tokenizer.sep_token_id
    assert tokens["attention_mask"][1].sum() == 3  # [CLS] liver [SEP]
    with torch.no_grad():
        z = encoder([long_text])
        direct = encoder.encode_tokens(tokens["input_ids"][:1], tokens["attention_mask"][:1])
    torch.testing.assert_close(z, direct)


def test_max_length_beyond_position_embeddings(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    model = BertModel(cfg)
    with pytest.raises(VolfmError, match="max_length=128 is longer than the text model allows"):
        TextEncoder(model, tokenizer, max_length=128)
    model.save_pretrained(str(tmp_path / "m"))
    tokenizer.save_pretrained(str(tmp_path / "m"))
    with pytest.raises(VolfmError, match="max_position_embeddings=64"):
        build_text_encoder(tmp_path / "m", max_length=128)
    assert build_text_encoder(tmp_path / "m", max_length=64).max_length == 64
    # the default model grows its position table to fit max_length
    assert build_text_encoder(tokenizer=tokenizer, max_length=1024, **SMALL).model.config.max_position_embeddings \
        == 1024


def test_local_folder_reload_identical(tmp_path, tokenizer, reports):
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=128)
    model = BertModel(cfg).eval()  # a user's model with a pooler, saved the Hugging Face way
    folder = tmp_path / "tiny_bert"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    original = TextEncoder(model, tokenizer, max_length=96, pooling="mean")
    loaded = build_text_encoder(str(folder), max_length=96, pooling="mean").eval()
    assert loaded.hidden_size == 24 and loaded.model.pooler is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(reports[:4]), original(reports[:4]), atol=0, rtol=0)

    # TextEncoder.save_pretrained / from_pretrained, and plain AutoModel/AutoTokenizer on its folder
    torch.manual_seed(2)
    enc = build_text_encoder(tokenizer=tokenizer, max_length=80, pooling="mean", **SMALL).eval()
    out = enc.save_pretrained(tmp_path / "enc")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    again = TextEncoder.from_pretrained(out).eval()
    assert again.max_length == 80 and again.pooling == "mean" and again.model.pooler is None
    with torch.no_grad():
        torch.testing.assert_close(again(reports[:4]), enc(reports[:4]), atol=0, rtol=0)
    hf_model = AutoModel.from_pretrained(str(out), local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert hf_tok(reports[0])["input_ids"] == tokenizer(reports[0])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(TextEncoder(hf_model, hf_tok, max_length=80, pooling="mean")(reports[:2]),
                                   enc(reports[:2]), atol=0, rtol=0)
    assert TextEncoder.from_pretrained(out, pooling="cls").pooling == "cls"


def test_spec_roundtrip_without_files(tokenizer, reports):
    torch.manual_seed(3)
    enc = build_text_encoder(tokenizer=tokenizer, max_length=64, **SMALL).eval()
    spec = json.loads(json.dumps(enc.to_spec()))  # pure JSON
    rebuilt = TextEncoder.from_spec(spec)
    rebuilt.load_state_dict(enc.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(reports[:3]), enc(reports[:3]), atol=0, rtol=0)


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_missing_path_fails_fast_without_network(tmp_path, no_network):
    start = time.monotonic()
    with pytest.raises(VolfmError) as err:
        build_text_encoder("emilyalsentzer/Bio_ClinicalBERT")
    msg = str(err.value)
    assert "emilyalsentzer/Bio_ClinicalBERT" in msg and "does not exist" in msg
    assert "local folder" in msg and "never downloads" in msg and "save_pretrained" in msg
    assert time.monotonic() - start < 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolfmError, match="has no config.json"):
        build_text_encoder(tmp_path / "empty")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(VolfmError, match="is not a folder"):
        build_text_encoder(str(tmp_path / "file.bin"))


def test_folder_without_tokenizer(tmp_path, tokenizer, no_network):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)
    BertModel(cfg).save_pretrained(str(tmp_path / "m"))
    with pytest.raises(VolfmError, match="has no tokenizer files"):
        build_text_encoder(tmp_path / "m")
    assert build_text_encoder(tmp_path / "m", tokenizer=tokenizer, max_length=32).hidden_size == 16
    small = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    with pytest.raises(VolfmError, match="embedding table only 50"):
        TextEncoder(small, tokenizer)


def test_gradients_reach_text_model(tokenizer, reports):
    torch.manual_seed(0)
    enc = build_text_encoder(tokenizer=tokenizer, max_length=64, pooling="mean", **SMALL).train()
    loss = enc(reports[:2]).pow(2).sum()
    loss.backward()
    grads = {n: p.grad for n, p in enc.named_parameters()}
    assert all(g is not None for g in grads.values())  # no unused parameters (no pooler)
    assert grads["model.embeddings.word_embeddings.weight"].abs().sum() > 0
    assert grads["model.encoder.layer.0.attention.self.query.weight"].abs().sum() > 0


def test_longformer_style_model(tokenizer):
    cfg = LongformerConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, attention_window=4, max_position_embeddings=66, pad_token_id=0)
    model = LongformerModel(cfg).eval()
    with pytest.raises(VolfmError, match=r"allows \(65 tokens"):  # positions start after the padding index
        TextEncoder(model, tokenizer, max_length=66)
    enc = TextEncoder(model, tokenizer, max_length=65)
    with torch.no_grad():
        assert enc(["liver: normal.", "spleen: enlarged, measuring 16 cm."]).shape == (2, 16)


def test_merlin_text_settings(tokenizer, tmp_path):
    """global_attention="none" is the model called without a global attention mask (Merlin); "first" differs from
    it; normalize="merlin" lower-cases and splits punctuation before tokenizing; both survive save/load and specs."""
    torch.manual_seed(0)
    cfg = LongformerConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, attention_window=4, max_position_embeddings=66, pad_token_id=0)
    model = LongformerModel(cfg).eval()
    texts = ["Liver: Normal. Spleen: enlarged, 16 cm.", "Kidneys: normal size, no stones seen in either."]
    merlin = TextEncoder(model, tokenizer, max_length=65, global_attention="none", normalize="merlin")
    first = TextEncoder(model, tokenizer, max_length=65)
    sanitized = ["liver : normal . spleen : enlarged , 16 cm .", "kidneys : normal size , no stones seen in either ."]
    toks = merlin.tokenize(texts)
    assert torch.equal(toks["input_ids"], first.tokenize(sanitized)["input_ids"])
    with torch.no_grad():
        want = model(**toks).last_hidden_state[:, 0]  # Merlin: no global_attention_mask, first token
        assert torch.allclose(merlin(texts), want, atol=1e-6)
        assert (first(sanitized) - want).abs().max() > 1e-4
    again = TextEncoder.from_pretrained(merlin.save_pretrained(tmp_path / "t"))
    assert (again.global_attention, again.normalize) == ("none", "merlin")
    spec = TextEncoder.from_spec(merlin.to_spec())
    assert (spec.global_attention, spec.normalize) == ("none", "merlin")
    with pytest.raises(VolfmError, match="global_attention"):
        TextEncoder(model, tokenizer, max_length=65, global_attention="all")
    with pytest.raises(VolfmError, match="normalize"):
        TextEncoder(model, tokenizer, max_length=65, normalize="lower")
