"""SentencePiece tokenizer for Python source: training, loading, and its `<prefix>.json` sidecar.

Special ids are fixed (pad=0, unk=1, bos=2, eos=3) and the end-of-document token is eos,
so every tool and the trainer agree without configuration. The sidecar `<prefix>.json`
records them for readers that do not want to load SentencePiece.
"""

import hashlib
import io
import json
import os
import random
from typing import Iterable, Iterator, List, Sequence

import sentencepiece as spm

from blade_mega.atomic import write_atomic
from blade_mega.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")


def meta_path_for(model_path: str) -> str:
    """`<prefix>.model` -> `<prefix>.json`."""
    return os.path.splitext(model_path)[0] + ".json"


class Tokenizer:
    """A loaded SentencePiece model plus its special ids.

    Also usable as the `tokenizer` of megatron.core's GPTDatasetConfig (`vocab_size`, `eod`,
    `pad`, `unique_identifiers`).
    """

    def __init__(
        self, processor: spm.SentencePieceProcessor, model_path: str, model_type: str, model_sha256: str
    ):
        self._sp = processor
        self.model_path = model_path
        self.model_type = model_type
        self.model_sha256 = model_sha256
        self.vocab_size: int = processor.get_piece_size()
        self.pad_id: int = processor.pad_id()
        self.unk_id: int = processor.unk_id()
        self.bos_id: int = processor.bos_id()
        self.eod_id: int = processor.eos_id()

    @classmethod
    def load(cls, model_path: str) -> "Tokenizer":
        """Load `<prefix>.model`; check it against `<prefix>.json` when that exists."""
        if not os.path.isfile(model_path):
            raise UserError(
                f"tokenizer model not found: {model_path}; "
                "train one with tools/train_tokenizer.py or fix --tokenizer-model"
            )
        with open(model_path, "rb") as f:
            tokenizer = cls._from_proto(f.read(), model_path)
        tokenizer._check_sidecar()
        return tokenizer

    @classmethod
    def _from_proto(cls, proto: bytes, model_path: str) -> "Tokenizer":
        processor = spm.SentencePieceProcessor()
        try:
            processor.load_from_serialized_proto(proto)
        except (RuntimeError, OSError) as err:
            raise UserError(
                f"tokenizer model {model_path} is not a valid SentencePiece model ({err}); "
                "retrain it with tools/train_tokenizer.py"
            ) from None
        if processor.pad_id() < 0 or processor.eos_id() < 0:
            raise UserError(
                f"tokenizer model {model_path} has no pad or eos id; "
                "retrain it with tools/train_tokenizer.py"
            )
        return cls(processor, model_path, _model_type_name(proto), hashlib.sha256(proto).hexdigest())

    def _check_sidecar(self) -> None:
        """A stale `.json` would silently give the trainer wrong EOD/pad ids."""
        path = meta_path_for(self.model_path)
        if not os.path.exists(path):
            return
        try:
            with open(path, encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError) as err:
            raise UserError(
                f"tokenizer metadata {path} is unreadable ({err}); delete it or retrain"
            ) from None
        actual = self.metadata()
        mismatched = sorted(k for k in actual if k in recorded and recorded[k] != actual[k])
        if mismatched:
            raise UserError(
                f"tokenizer metadata {path} does not match {self.model_path} "
                f"(differs in {', '.join(mismatched)}); delete it or retrain the tokenizer"
            )

    # megatron.core's dataset code reads these names.
    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def pad(self) -> int:
        return self.pad_id

    @property
    def unique_identifiers(self) -> dict:
        """Hashed by megatron.core into its dataset cache key."""
        return {"class": type(self).__name__, "model_sha256": self.model_sha256}

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # One thread: parallelism comes from worker processes, whose count the user chose.
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def metadata(self) -> dict:
        """What `<prefix>.json` holds."""
        return {
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "unk_id": self.unk_id,
            "model_type": self.model_type,
        }


def _model_type_name(proto: bytes) -> str:
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(model.trainer_spec.model_type).lower()


def sample_lines(texts: Iterable[str], max_lines: int, seed: int) -> List[str]:
    """Seeded reservoir sample of the non-empty lines of `texts`, in input order.

    SentencePiece trains on lines ("sentences"); sampling here rather than inside SentencePiece
    keeps memory bounded and makes the result depend only on the inputs and `seed`.
    """
    rng = random.Random(seed)
    reservoir: List[tuple] = []
    for position, line in enumerate(_non_empty_lines(texts)):
        if len(reservoir) < max_lines:
            reservoir.append((position, line))
        else:
            slot = rng.randrange(position + 1)
            if slot < max_lines:
                reservoir[slot] = (position, line)
    reservoir.sort()
    return [line for _, line in reservoir]


def _non_empty_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    seed: int = 0,
    max_sentences: int = 2_000_000,
) -> Tokenizer:
    """Train on `texts`, write `<model_prefix>.model` and `<model_prefix>.json` atomically.

    Same texts + arguments give a byte-identical model (one thread, no SentencePiece shuffling,
    seeded sampling).
    """
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown model type {model_type!r}; use one of {', '.join(MODEL_TYPES)}")
    sentences = sample_lines(texts, max_sentences, seed)
    if not sentences:
        raise UserError("no text to train the tokenizer on; check --input and --json-keys")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            # Code: keep every space and newline, split numbers, and fall back to bytes so any
            # text round-trips through encode/decode.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            user_defined_symbols=["\n"],
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise UserError(
            f"sentencepiece could not train ({str(err).strip()}); "
            "lower --vocab-size or give more input text"
        ) from None
    model_path = model_prefix + ".model"
    tokenizer = Tokenizer._from_proto(model.getvalue(), model_path)
    meta = json.dumps(tokenizer.metadata(), indent=2, sort_keys=True) + "\n"
    _write_atomically(meta_path_for(model_path), meta.encode("utf-8"))
    _write_atomically(model_path, model.getvalue())
    return tokenizer


def _write_atomically(path: str, data: bytes) -> None:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, data)
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror}); choose a writable location") from None
