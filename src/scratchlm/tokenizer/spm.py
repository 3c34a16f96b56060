"""SentencePiece BPE models (Llama 2's ``tokenizer.model``), read and encoded by our code.

SentencePiece works on characters, not bytes:

1. normalise: replace each space by "▁" (U+2581) and put one "▁" in front of the text
   (``add_dummy_prefix``), so "Hello world" becomes "▁Hello▁world";
2. start from one symbol per character; repeatedly merge the adjacent pair whose
   concatenation is a piece of the vocabulary with the highest score (ties: leftmost);
3. a symbol that is not a piece becomes the ids of its UTF-8 bytes, pieces "<0x41>"
   and so on (``byte_fallback``, as in Llama 2), or the unknown id.

The ``.model`` file is a protocol buffer; ``read_model_proto`` decodes the few fields we
need with a 30-line reader, so loading needs no protobuf package. Encoding has the
pure-Python reference here and uses the ``sentencepiece`` library as the fast path when
it is installed (the tests check that both give the same ids). Models the reference does
not cover (unigram, or NFKC normalisation as ``spm_train`` does by default) encode through
the library only.
"""

from __future__ import annotations

import heapq
import os
import struct
from pathlib import Path

import regex

from .base import Tokenizer, TokenizerError
from .files import remove_stale_files, require_directory
from .hf_json import write_tokenizer_config

SPACE = "\u2581"  # "▁", SentencePiece's visible space

# SentencePiece.Type in sentencepiece_model.proto
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


# ---- a minimal protocol-buffer reader -------------------------------------------------------
def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes):
    """Yield (field number, value) of a message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated message")
        yield field, value


def read_model_proto(data: bytes) -> dict:
    """The parts of a SentencePiece ModelProto that encoding needs."""
    pieces, trainer, normalizer = [], {}, {}
    for field, value in _fields(data):
        if field == 1:  # repeated SentencePiece {1: piece, 2: score (float), 3: type}
            piece = {"piece": "", "score": 0.0, "type": NORMAL}
            for f, v in _fields(value):
                if f == 1:
                    piece["piece"] = v.decode("utf-8")
                elif f == 2:
                    piece["score"] = struct.unpack("<f", v)[0]
                elif f == 3:
                    piece["type"] = v
            pieces.append(piece)
        elif field == 2:  # TrainerSpec
            trainer = dict(_fields(value))
        elif field == 3:  # NormalizerSpec
            normalizer = dict(_fields(value))
    if not pieces:
        raise ValueError("no pieces")

    def signed(v, default):  # int32 ids are varints; -1 is stored as 2**64 - 1
        v = trainer.get(v, default)
        return v - (1 << 64) if v >= 1 << 63 else v

    return {
        "pieces": pieces,
        "model_type": MODEL_TYPES.get(trainer.get(3, 1), "unknown"),
        "byte_fallback": bool(trainer.get(35, 0)),
        "treat_whitespace_as_suffix": bool(trainer.get(24, 0)),
        "unk_id": signed(40, 0), "bos_id": signed(41, 1), "eos_id": signed(42, 2), "pad_id": signed(43, -1),
        "normalizer_name": normalizer.get(1, b"nmt_nfkc").decode(),
        "add_dummy_prefix": bool(normalizer.get(3, 1)),
        "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
        "escape_whitespaces": bool(normalizer.get(5, 1)),
    }


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece BPE model: reference encoder in Python, fast path via ``sentencepiece``."""

    def __init__(self, model_bytes: bytes, source: str = "tokenizer.model", config: dict | None = None):
        try:
            spec = read_model_proto(model_bytes)
        except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
            raise TokenizerError(f"{source}: not a SentencePiece model ({e})") from None
        self.model_bytes = model_bytes
        self.spec = spec
        self.pieces = spec["pieces"]
        self.piece_to_id = {p["piece"]: i for i, p in enumerate(self.pieces)}
        # Pieces that merges may produce: normal and user-defined ones, with their scores.
        self.scores = {p["piece"]: p["score"] for p in self.pieces if p["type"] in (NORMAL, USER_DEFINED)}
        self.user_defined = sorted((p["piece"] for p in self.pieces if p["type"] == USER_DEFINED),
                                   key=len, reverse=True)
        self.byte_ids = {}  # byte value -> id of its piece "<0x41>"
        for i, p in enumerate(self.pieces):
            if p["type"] == BYTE:
                if not regex.fullmatch(r"<0x[0-9A-Fa-f]{2}>", p["piece"]):
                    raise TokenizerError(f"{source}: byte piece {p['piece']!r} is not of the form <0xHH>")
                self.byte_ids[int(p["piece"][3:5], 16)] = i
        config = config or {}
        specials = {p["piece"]: i for i, p in enumerate(self.pieces) if p["type"] in (CONTROL, UNKNOWN)}
        specials.update({k: v for k, v in (config.get("added_tokens") or {}).items()
                         if k not in specials and 0 <= v < len(self.pieces)
                         and self.pieces[v]["type"] != NORMAL})
        self.special_tokens = specials
        self.unk_id = spec["unk_id"]
        self.bos_token = config.get("bos_token") or self._piece(spec["bos_id"])
        self.eos_token = config.get("eos_token") or self._piece(spec["eos_id"])
        self.chat_template = config.get("chat_template")
        self._table = {}
        for i, p in enumerate(self.pieces):
            if p["type"] == BYTE:
                self._table[i] = bytes([int(p["piece"][3:5], 16)])  # checked above
            elif p["type"] == CONTROL:
                self._table[i] = b""
            elif p["type"] == UNKNOWN:
                self._table[i] = " \u2047 ".encode()  # what SentencePiece decodes <unk> to
            else:
                self._table[i] = p["piece"].replace(SPACE, " ").encode("utf-8")
        self._processor = None

    @classmethod
    def load(cls, path: str | os.PathLike, config: dict | None = None) -> SentencePieceTokenizer:
        path = Path(path)
        return cls(path.read_bytes(), str(path), config)

    def _piece(self, i: int) -> str | None:
        return self.pieces[i]["piece"] if 0 <= i < len(self.pieces) else None

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    # ---- encoding -------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        """Spaces -> "▁", plus the dummy prefix (identity normalisation, as Llama 2)."""
        if self.spec["remove_extra_whitespaces"]:
            text = " ".join(t for t in text.split(" ") if t)
        if not text:
            return ""
        if self.spec["add_dummy_prefix"]:
            text = " " + text
        return text.replace(" ", SPACE) if self.spec["escape_whitespaces"] else text

    def encode_ordinary(self, text: str, fast: bool = True) -> list[int]:
        """Encode text in which special-token strings are plain text."""
        if fast and self._library() is not None:
            return self._library().encode(text)
        return self.encode_reference(text)

    def encode(self, text: str, allowed_special="all", fast: bool = True) -> list[int]:
        """Text -> ids; ``fast=False`` runs the pure-Python reference encoder."""
        return self._encode_split(text, allowed_special, self.encode_ordinary if fast else self.encode_reference)

    def _symbols(self, text: str) -> list[str]:
        """One symbol per character, user-defined pieces kept whole."""
        if not self.user_defined:
            return list(text)
        symbols, i = [], 0
        while i < len(text):
            match = next((u for u in self.user_defined if text.startswith(u, i)), None)
            symbols.append(match or text[i])
            i += len(match) if match else 1
        return symbols

    def encode_reference(self, text: str) -> list[int]:
        """The BPE loop over characters, best score first, with a heap of candidate pairs."""
        spec = self.spec
        if spec["model_type"] != "bpe" or spec["normalizer_name"] != "identity" or spec["treat_whitespace_as_suffix"]:
            raise TokenizerError(
                f"this SentencePiece model ({spec['model_type']}, normalizer {spec['normalizer_name']!r}) "
                "needs the sentencepiece package: the reference encoder does BPE with identity "
                "normalisation (Llama 2's settings)")
        text = self.normalize(text)
        symbols: list[str | None] = self._symbols(text)
        n = len(symbols)
        prev = list(range(-1, n - 1))  # a doubly linked list over the symbols
        nxt = list(range(1, n + 1))
        scores = self.scores
        heap: list = []

        def push(i: int, j: int):
            if 0 <= i and j < n:
                joined = symbols[i] + symbols[j]
                if joined in scores:  # highest score first; ties: leftmost
                    heapq.heappush(heap, (-scores[joined], i, symbols[i], symbols[j]))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i] if i < n else n
            # Skip entries made stale by an earlier merge at either side.
            if symbols[i] != left or j >= n or symbols[j] != right:
                continue
            symbols[i], symbols[j] = left + right, None
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prev[nxt[j]] = i
            push(prev[i], i)
            push(i, nxt[i])
        ids: list[int] = []
        for s in symbols:
            if s is None:
                continue
            if s in self.piece_to_id and self.pieces[self.piece_to_id[s]]["type"] in (NORMAL, USER_DEFINED):
                ids.append(self.piece_to_id[s])
            elif self.spec["byte_fallback"] and self.byte_ids:
                ids.extend(self.byte_ids[b] for b in s.encode("utf-8", errors="surrogatepass"))
            else:
                ids.append(self.unk_id)
        return ids

    def _library(self):
        """A ``sentencepiece.SentencePieceProcessor`` on the same model, or None."""
        if self._processor is None:
            try:
                import sentencepiece
            except ImportError:
                self._processor = False
            else:
                self._processor = sentencepiece.SentencePieceProcessor(model_proto=self.model_bytes)
        return self._processor or None

    # ---- decoding -------------------------------------------------------------------
    def _bytes_table(self) -> dict[int, bytes]:
        return self._table

    def decode(self, ids) -> str:
        """Text of the pieces, without the space the dummy prefix put in front."""
        text = super().decode(ids)
        return text[1:] if self.spec["add_dummy_prefix"] and text.startswith(" ") else text

    # decode_bytes (from the base class) keeps every piece's space, "▁world" -> b" world":
    # a stream of one-token decode_bytes reads " Hello world", where decode gives "Hello world".

    hf_tokenizer_json: str | None = None  # the tokenizer.json it was loaded beside, if any

    def hf_tokenizer_dict(self) -> dict:
        """A Hugging Face ``tokenizer.json`` that encodes like this model (Llama 2 style:
        BPE over characters with byte fallback, a "▁" prepended, spaces as "▁", and a
        post-processor that adds bos, as HF's Llama tokenizers do).

        HF merges the listed pair with the lowest index; SentencePiece the pair whose
        result has the highest score. So the list holds every split of every piece into
        two pieces, ordered by the score of the piece they make."""
        spec = self.spec
        if spec["model_type"] != "bpe" or spec["normalizer_name"] != "identity" \
                or spec["remove_extra_whitespaces"] or not spec["escape_whitespaces"] or self.user_defined:
            raise TokenizerError("only SentencePiece BPE models with Llama 2's settings (identity normaliser, "
                                 "spaces kept, no user-defined symbols) can be written as tokenizer.json")
        normal = {p["piece"]: (p["score"], i) for i, p in enumerate(self.pieces) if p["type"] == NORMAL}
        merges = []
        for piece, (score, i) in normal.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in normal and right in normal:
                    merges.append((-score, i, cut, left, right))
        merges.sort()
        added = [{"id": i, "content": p["piece"], "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True}
                 for i, p in enumerate(self.pieces) if p["type"] in (CONTROL, UNKNOWN)]
        bos = self._piece(spec["bos_id"])
        post = None
        if bos is not None:
            post = {"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos: {"id": bos, "ids": [spec["bos_id"]], "tokens": [bos]}}}
        prefix = [{"type": "Prepend", "prepend": SPACE}] if spec["add_dummy_prefix"] else []
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": prefix + [
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]},
            "pre_tokenizer": None,
            "post_processor": post,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])},
            "model": {"type": "BPE", "dropout": None, "unk_token": self._piece(self.unk_id),
                      "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                      "byte_fallback": spec["byte_fallback"], "ignore_merges": False,
                      "vocab": {p["piece"]: i for i, p in enumerate(self.pieces)},
                      "merges": [[left, right] for *_, left, right in merges]},
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.model`` (the SentencePiece file, unchanged), a Hugging Face
        ``tokenizer.json`` (the one it was loaded with, else ``hf_tokenizer_dict()`` when
        the model allows) and ``tokenizer_config.json``."""
        import json

        directory = require_directory(directory)
        (directory / "tokenizer.model").write_bytes(self.model_bytes)
        written = ("tokenizer.model", "tokenizer_config.json")
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        tokenizer_json = self.hf_tokenizer_json
        if tokenizer_json is None:
            try:
                tokenizer_json = json.dumps(self.hf_tokenizer_dict(), ensure_ascii=False)
                config.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
            except TokenizerError:
                pass  # tokenizer.model alone: transformers converts it (with protobuf installed)
        if tokenizer_json is not None:
            (directory / "tokenizer.json").write_text(tokenizer_json, "utf-8")
            written += ("tokenizer.json",)
        unk = self._piece(self.unk_id)
        if unk is not None:
            config["unk_token"] = unk
        write_tokenizer_config(self, directory, {k: v for k, v in config.items() if v is not None})
        remove_stale_files(directory, written)

    save_hf = save

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"
