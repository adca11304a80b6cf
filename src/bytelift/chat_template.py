"""Chat templates for byte models: the source tokenizer's template rendered to byte ids, and its end-of-turn marker.

A byteified model reads what its source read, spelled in bytes as the data pipeline spells source tokens
(`ByteTokenizer.source_bytes_and_patches`): the source's bos and eos tokens became the byte model's BOS and EOS
ids in training (its eos separated documents, its start-of-sequence id began them), every other special token
was its text. Chat prompts are spelled the same way. The source tokenizer renders the conversation with its own
template (its own bos/eos texts and chat markers), and the string becomes byte ids: the source's bos and eos
texts become BOS_ID and EOS_ID (the *reserved ids*, whose expanded ids point at the source's special embedding
rows and whose spellings the source prior predicts where the source predicts those tokens), every other
character — other chat markers included — its UTF-8 bytes. SmolLM2-Instruct's `<|im_start|>` and `<|im_end|>` are
its bos and eos, so its turns open with BOS_ID and end with EOS_ID, exactly as the source sees one token each.
A row always starts with BOS_ID (prepended when the rendering does not start with the source's bos), as every
byte-model input does.

The end-of-turn marker is the special token the template writes right after an assistant message. When it is
the source's eos, generation already stops at EOS; otherwise (Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`)
its text is a stop string (`bytelift.generation` adds it by default).
"""

from __future__ import annotations

import re

from transformers.tokenization_utils_base import BatchEncoding

# Stands for an assistant message when the template is rendered to find what follows one (it cannot occur in a
# template's own text).
_PROBE_REPLY = "\x00bytelift-probe-reply\x00"


class ChatTemplateMixin:
    """`apply_chat_template` and the end-of-turn marker of `ByteTokenizer`.

    The host class provides `source_tokenizer`, `source_vocab` (a `SourceVocabulary`), `expander`,
    `bos_token_id` / `eos_token_id` (the reserved BOS_ID / EOS_ID), `tokenize` + `convert_tokens_to_ids`
    (one id per byte) and `pad`.
    """

    def apply_chat_template(
        self,
        conversation,
        tools=None,
        documents=None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding=False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors=None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict | None = None,
        **kwargs,
    ):
        """Render a conversation (or a batch of them) with the source tokenizer's chat template.

        Arguments as `PreTrainedTokenizerBase.apply_chat_template` (template variables in `kwargs`). With
        `tokenize=False` the source's rendered string; otherwise byte ids (see the module docstring: the source's
        bos/eos texts are BOS_ID/EOS_ID, everything else its bytes, BOS_ID first), with `attention_mask` and
        `expanded_ids` when `return_dict`, padded (on the tokenizer's side, left by default) when `padding`.
        """
        source = self.chat_source_tokenizer()
        if truncation or return_assistant_tokens_mask:
            raise ValueError("ByteTokenizer.apply_chat_template does not truncate or mark assistant tokens")
        rendered = source.apply_chat_template(
            conversation, tools=tools, documents=documents, chat_template=chat_template,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tokenize=False, **kwargs,
        )
        if not tokenize:
            return rendered
        batched = isinstance(rendered, list)
        rows = [self.chat_ids(text) for text in (rendered if batched else [rendered])]
        features = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        if self.expander is not None:
            features["expanded_ids"] = [e.tolist() for e in self.expander.expand_many(rows)]
        if padding or return_tensors is not None:
            out = self.pad(features, padding=padding, max_length=max_length, return_tensors=return_tensors,
                           **(tokenizer_kwargs or {}))
        else:
            out = BatchEncoding(features if batched else {k: v[0] for k, v in features.items()})
        return out if return_dict else out["input_ids"]

    def chat_ids(self, text: str) -> list[int]:
        """A rendered chat string -> byte ids: the source's bos/eos texts as BOS_ID/EOS_ID, the rest its UTF-8
        bytes; BOS_ID first."""
        reserved = self._reserved_texts()
        ids: list[int] = []
        start = 0
        for match in _alternation(reserved).finditer(text) if reserved else ():
            ids += self.convert_tokens_to_ids(self.tokenize(text[start : match.start()]))
            ids.append(reserved[match.group()])
            start = match.end()
        ids += self.convert_tokens_to_ids(self.tokenize(text[start:]))
        if not ids or ids[0] != self.bos_token_id:
            ids.insert(0, self.bos_token_id)
        return ids

    @property
    def end_of_turn(self) -> str | None:
        """The source's text of the special token its chat template writes right after an assistant message
        (None without a template, or when no special token follows one)."""
        if "_end_of_turn" not in self.__dict__:
            self._end_of_turn = self._find_end_of_turn()
        return self._end_of_turn

    @property
    def end_of_turn_stop(self) -> str | None:
        """The end-of-turn marker as a stop string for `generate`: None where there is no marker or where it is
        the source's eos (spelled EOS_ID, which generation stops at anyway)."""
        marker = self.end_of_turn
        if marker is None or self._reserved_texts().get(marker) == self.eos_token_id:
            return None
        return marker

    def chat_source_tokenizer(self):
        """The source tokenizer, which renders chats (a ValueError when it has no chat template)."""
        source = self.source_tokenizer
        if source is None or not getattr(source, "chat_template", None):
            raise ValueError(
                "this byte tokenizer's source tokenizer has no chat template; render prompts yourself, or set "
                "one on tokenizer.source_tokenizer.chat_template"
            )
        return source

    # --- helpers -------------------------------------------------------------------------------------------

    def _reserved_texts(self) -> dict[str, int]:
        """Source special-token text -> reserved byte-side id: its bos -> BOS_ID, its eos -> EOS_ID (eos wins
        where one token is both, as in `source_bytes_and_patches`)."""
        vocab = self.source_vocab
        if vocab is None:
            return {}
        out = {}
        for source_id, byte_id in ((vocab.bos_id, self.bos_token_id), (vocab.eos_id, self.eos_token_id)):
            text = vocab.special_contents.get(source_id) if source_id is not None else None
            if text:
                out[text] = byte_id
        return out

    def _find_end_of_turn(self) -> str | None:
        source = self.source_tokenizer
        if source is None or not getattr(source, "chat_template", None):
            return None
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
        try:
            rendered = source.apply_chat_template(probe, tokenize=False)
        except Exception:  # a template may refuse the probe (e.g. it demands a system message): no marker
            return None
        _, found, after = rendered.partition(_PROBE_REPLY)
        if not found:
            return None
        after = after.lstrip(" ")
        specials = sorted(set(self.source_vocab.special_contents.values()), key=len, reverse=True)
        return next((s for s in specials if s and after.startswith(s)), None)


def _alternation(texts) -> re.Pattern:
    """A regex matching any of `texts`, longest first (so a text that extends another wins)."""
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))
