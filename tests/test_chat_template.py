"""Chat templates: the source's rendering spelled in bytes (bos/eos as reserved ids), the end-of-turn marker."""

from __future__ import annotations

import pytest

from bytelift.tokenization import BOS_ID, BYTE_OFFSET, EOS_ID, ByteTokenizer
from tests.tiny_tokenizers import make_bytelevel_tokenizer, make_sentencepiece_tokenizer

# Turns open with the source's bos and end with its eos (as SmolLM2-Instruct's <|im_start|> / <|im_end|>).
EOS_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)
# Turns end with a special token that is not the eos (as Llama 3's <|eot_id|>), and no bos opens the chat.
TURN_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Héllo 🙂, what is <b>?"},
    {"role": "assistant", "content": "A tag."},
    {"role": "user", "content": "Thanks"},
]


def chat_source(template: str = EOS_TEMPLATE, turn_token: bool = False):
    """A fresh tiny byte-level source tokenizer with a chat template (and an <|end|> special token)."""
    tok = make_bytelevel_tokenizer()
    if turn_token:
        tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def eos_chat():
    return ByteTokenizer.from_source(chat_source())


@pytest.fixture(scope="module")
def turn_chat():
    return ByteTokenizer.from_source(chat_source(TURN_TEMPLATE, turn_token=True))


def _as_source_text(tok: ByteTokenizer, ids) -> str:
    """Byte ids back to the source's text: BOS/EOS as the source's bos/eos strings, bytes as UTF-8."""
    src = tok.source_tokenizer
    names = {BOS_ID: src.bos_token, EOS_ID: src.eos_token}
    out, buf = [], bytearray()
    for i in ids:
        if i in names:
            out.append(buf.decode())
            buf = bytearray()
            out.append(names[i])
        else:
            buf.append(i - BYTE_OFFSET)
    return "".join(out) + buf.decode()


def test_rendering_is_the_source_tokens_spelled_as_in_training(eos_chat):
    """The ids are exactly the data pipeline's spelling of the source's own tokenization of the chat."""
    rendered = eos_chat.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered == eos_chat.source_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = eos_chat.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    source_ids = eos_chat.source_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    expected, _ = eos_chat.source_bytes_and_patches(source_ids)
    assert ids == expected.tolist()
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 5 and ids.count(EOS_ID) == 4


@pytest.mark.parametrize("make", [make_bytelevel_tokenizer, make_sentencepiece_tokenizer])
def test_chat_bytes_equal_the_rendered_string(make):
    """Reserved ids stand for the source's bos/eos texts; every other character is its UTF-8 bytes. The
    template reads the *source's* special tokens (`bos_token` renders as the source's, not '<bos>')."""
    src = make()
    src.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    tok = ByteTokenizer.from_source(src)
    rendered = src.apply_chat_template(CHAT, tokenize=False)
    ids = tok.apply_chat_template(CHAT, return_dict=False)
    assert _as_source_text(tok, ids) == rendered
    assert rendered.startswith(src.bos_token) and ids.count(BOS_ID) == 1 and ids.count(EOS_ID) == len(CHAT)


def test_other_special_tokens_are_text_and_bos_is_prepended(turn_chat):
    rendered = turn_chat.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = turn_chat.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert ids[0] == BOS_ID  # the rendering has no bos: every byte-model input starts with one
    assert ids[1:] == [b + BYTE_OFFSET for b in rendered.encode()]  # <|end|> included, as its bytes


def test_batch_is_left_padded_with_expanded_ids(eos_chat):
    chats = [CHAT[:2], CHAT]
    batch = eos_chat.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "expanded_ids"}
    for row, chat in enumerate(chats):
        single = eos_chat.apply_chat_template(chat, add_generation_prompt=True)
        n = len(single["input_ids"])
        mask = batch["attention_mask"][row]
        assert int(mask.sum()) == n and bool(mask[-n:].all())  # left padding
        assert batch["input_ids"][row, -n:].tolist() == single["input_ids"]
        assert batch["expanded_ids"][row, -n:].tolist() == single["expanded_ids"]
        assert single["expanded_ids"] == eos_chat.expander.expand(single["input_ids"]).tolist()


def test_end_of_turn_marker(eos_chat, turn_chat):
    assert eos_chat.end_of_turn == "<|endoftext|>" and eos_chat.end_of_turn_stop is None  # the eos: EOS_ID
    assert turn_chat.end_of_turn == turn_chat.end_of_turn_stop == "<|end|>"
    assert ByteTokenizer.from_source(make_bytelevel_tokenizer()).end_of_turn is None  # no template
    ids = turn_chat("Hi<|end|>\n")["input_ids"]
    assert turn_chat.decode(ids, skip_special_tokens=True) == "Hi\n"  # dropped like the source's special token
    assert turn_chat.decode(ids) == "<bos>Hi<|end|>\n"


def test_no_template_is_a_clear_error():
    tok = ByteTokenizer.from_source(make_bytelevel_tokenizer())
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CHAT)
    with pytest.raises(ValueError, match="truncate"):
        ByteTokenizer.from_source(chat_source()).apply_chat_template(CHAT, truncation=True, max_length=8)


def test_template_survives_save_and_load(eos_chat, tmp_path):
    eos_chat.save_pretrained(tmp_path)
    loaded = ByteTokenizer.from_pretrained(tmp_path)
    assert loaded.apply_chat_template(CHAT, return_dict=False) == eos_chat.apply_chat_template(CHAT, return_dict=False)


@pytest.mark.slow
def test_smollm2_chat_is_spelled_as_in_training(smollm2_tokenizer):
    """The packaged source: <|im_start|>/<|im_end|> (its bos/eos) are BOS/EOS, its default system turn is
    rendered, and its end of turn is EOS (no stop string needed)."""
    tok = ByteTokenizer.from_source(smollm2_tokenizer)
    ids = tok.apply_chat_template(CHAT[1:], add_generation_prompt=True, return_dict=False)
    rendered = tok.apply_chat_template(CHAT[1:], add_generation_prompt=True, tokenize=False)
    expected, _ = tok.source_bytes_and_patches(smollm2_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert ids == expected.tolist() and _as_source_text(tok, ids) == rendered
    assert "You are a helpful AI assistant named SmolLM" in rendered
    assert tok.end_of_turn == "<|im_end|>" and tok.end_of_turn_stop is None
