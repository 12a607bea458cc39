"""The Qwen2.5 tokenizer, read from a checkpoint's ``tokenizer.json`` with the ``tokenizers`` library.

transformers is not needed at run time: Qwen2.5's ``tokenizer.json`` holds the whole pipeline
(byte-level BPE with a pre-tokenizer that splits digits one per token).
"""

from __future__ import annotations

import json
from pathlib import Path

from qwenlite.errors import QwenliteError


class Tokenizer:
    """Encode text to Qwen2.5 token ids and back.

    Args:
        path: a ``tokenizer.json`` file, or a checkpoint directory that holds one.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise QwenliteError(f"no tokenizer.json at {file}")
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise QwenliteError(f"cannot read tokenizer {file}: {exc}") from exc
        self.path = file
        self.eos_token_id = self._special_id(file.parent, "eos_token", "<|im_end|>")
        self.pad_token_id = self._special_id(file.parent, "pad_token", "<|endoftext|>")

    def _special_id(self, directory: Path, key: str, fallback: str) -> int | None:
        name = fallback
        config = directory / "tokenizer_config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                name = value
        return self._tok.token_to_id(name)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text of token ids (a list, tuple or 1-D tensor)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(idx)
