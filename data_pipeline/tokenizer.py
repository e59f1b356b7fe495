"""Text tokenizer of a model folder: LlamaTokenizerFast, multi-character Chinese tokens split into single
characters (as VoxCPM's `mask_multichar_chinese_tokens`), no BOS/EOS."""
from __future__ import annotations

import hashlib
from pathlib import Path

METASPACE = "\u2581"
# the files of a model folder that make its tokenizer (the rest - config.json, weights - are not hashed or copied)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model")


def tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer files present in `folder` (a tokenizer folder, a model folder or an hf_assets)."""
    return [Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]


def _is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff"


class TextTokenizer:
    """`tokenizer(text) -> list[int]`. Audio special ids: 101 start, 102 end, 103 ref start, 104 ref end."""

    def __init__(self, path: str | Path):
        from transformers import LlamaTokenizerFast

        self.path = Path(path)
        self.hf = LlamaTokenizerFast.from_pretrained(str(path))
        self.cjk_multichar = {t for t in self.hf.get_vocab() if len(t) >= 2 and all(map(_is_cjk, t))}
        self.unk_id = self.hf.unk_token_id

    def tokens(self, text: str) -> list[str]:
        out: list[str] = []
        for tok in self.hf.tokenize(text):
            bare = tok.replace(METASPACE, "")
            out.extend(bare) if bare in self.cjk_multichar else out.append(tok)
        return out

    def __call__(self, text: str) -> list[int]:
        return self.hf.convert_tokens_to_ids(self.tokens(text))

    def batch(self, texts: list[str]) -> list[list[int]]:
        """`[self(t) for t in texts]`, encoded in one call of the Rust tokenizer (the encoding `tokenize`
        runs per text); only ids whose token `__call__` maps differently (multi-character Chinese tokens,
        tokens whose vocabulary id differs) are rewritten."""
        if not texts:
            return []
        backend = self.hf.backend_tokenizer
        if backend.encode_special_tokens != bool(self.hf.split_special_tokens):
            return [self(t) for t in texts]
        fix = self._id_rewrites()
        out = []
        for enc in backend.encode_batch(list(texts), add_special_tokens=False):
            ids = enc.ids
            if not fix.keys().isdisjoint(ids):
                ids = [j for i in ids for j in fix.get(i, (i,))]
            out.append(ids)
        return out

    def _id_rewrites(self) -> dict[int, list[int]]:
        """{id: the ids `__call__` gives for its token} where that is not just [id]."""
        if getattr(self, "_rewrites", None) is None:
            backend, fix = self.hf.backend_tokenizer, {}
            for i in range(backend.get_vocab_size(with_added_tokens=True)):
                tok = backend.id_to_token(i)
                if tok is None:
                    continue
                bare = tok.replace(METASPACE, "")
                ids = self.hf.convert_tokens_to_ids(list(bare)) if bare in self.cjk_multichar else \
                    [self.hf.convert_tokens_to_ids(tok)]
                if ids != [i]:
                    fix[i] = ids
            self._rewrites = fix
        return self._rewrites

    def fingerprint(self) -> str:
        """Hash of the tokenizer files (`TOKENIZER_FILES`; the key of stored token ids): the same for a model
        folder, its import's hf_assets and a run's, whatever else they hold."""
        h = hashlib.sha256()
        for path in tokenizer_files(self.path):
            h.update(path.name.encode() + path.read_bytes())
        return h.hexdigest()[:16]
