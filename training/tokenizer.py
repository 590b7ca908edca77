"""A character-level tokenizer, so the default job needs nothing downloaded.

It implements the small part of the Hugging Face tokenizer interface the data
pipeline uses (encode, decode, apply_chat_template, special token ids), so the
pipeline has one code path for both.
"""
from __future__ import annotations

import string

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class CharTokenizer:
    def __init__(self, chars: str = string.printable):
        # A task with a small alphabet gets a small vocabulary: fewer ways to put mass on junk.
        self.vocab = list(SPECIALS) + list(chars)
        self.ids = {token: i for i, token in enumerate(self.vocab)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(len(SPECIALS))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.ids.get(char, self.unk_token_id) for char in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        specials = len(SPECIALS) if skip_special_tokens else 0
        return "".join(self.vocab[i] for i in ids if int(i) >= specials)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant: "
        return self.encode(text, add_special_tokens=False) if tokenize else text
