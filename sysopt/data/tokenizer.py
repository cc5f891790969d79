"""A tiny fixed-vocabulary tokenizer for the digit tasks: words and punctuation are tokens, numbers are
split into single digits, and four special tokens mark padding, images and sequence ends."""

from __future__ import annotations

import re

PAD, IMAGE, BOS, EOS = "<pad>", "<image>", "<bos>", "<eos>"
SPECIALS = (PAD, IMAGE, BOS, EOS)
DIGITS = tuple(str(d) for d in range(10))
WORDS = ("shows", "plus", "is", "the", "largest", ":", ".")
VOCAB = SPECIALS + DIGITS + WORDS

_PIECE = re.compile(r"<[a-z]+>|[0-9]|[a-z]+|[^\sa-z0-9<>]")


class Tokenizer:
    """Maps text to ids and back over the fixed vocabulary `VOCAB` (pad is id 0)."""

    def __init__(self) -> None:
        self.vocab = VOCAB
        self.id_of = {tok: i for i, tok in enumerate(VOCAB)}
        self.pad_id, self.image_id = self.id_of[PAD], self.id_of[IMAGE]
        self.bos_id, self.eos_id = self.id_of[BOS], self.id_of[EOS]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def pieces(self, text: str) -> list[str]:
        return _PIECE.findall(text)

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pieces(text):
            if piece not in self.id_of:
                raise ValueError(
                    f"token {piece!r} in {text!r} is not in the fixed vocabulary {self.vocab}; "
                    "add it to sysopt.data.tokenizer.WORDS"
                )
            ids.append(self.id_of[piece])
        return ids

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)
