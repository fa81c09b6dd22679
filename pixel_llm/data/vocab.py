"""SentencePiece vocabulary for small (synthetic) corpora: deterministic training and seqio loading.

The ids follow T5: pad 0, eos 1, unk 2 and no BOS piece (the decoder's BOS is the pad id 0).

  path = train_spm(captions + prompts, "DIR/spiece", vocab_size=256)   # writes .model and .vocab
  vocab = load(path)                                                    # seqio.SentencePieceVocabulary
"""
import collections
import io
import os
import tempfile
from collections.abc import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model

from pixel_llm import workdir as layout

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


def _seed_pieces(texts: list[str], max_len: int = 16) -> list[tuple[str, int]]:
  """Every substring (2..max_len characters) of every "\u2581word", with its count, best first."""
  counts = collections.Counter()
  for text in texts:
    for word in text.split():
      word = "\u2581" + word
      for i in range(len(word)):
        for j in range(i + 2, min(len(word), i + max_len) + 1):
          counts[word[i:j]] += 1
  return sorted(counts.items(), key=lambda kv: (-kv[1] * len(kv[0]), kv[0]))


def train_spm(texts: Iterable[str], out_prefix: str, vocab_size: int = 256,
              model_type: str = "unigram") -> str:
  """Trains a SentencePiece model on `texts`; writes `{out_prefix}.model` and `.vocab`.

  The same texts give the same bytes: training reads an in-memory iterator, keeps every sentence
  in order, runs on one thread, and no temp-file path is left in the model's trainer spec.
  `hard_vocab_limit=False` lets a tiny corpus end with fewer pieces than `vocab_size`.
  Returns the path of the .model file.
  """
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("train_spm needs at least one non-empty text")
  spm.set_random_generator_seed(0)
  writer = io.BytesIO()
  with tempfile.TemporaryDirectory() as tmp:
    extra = {}
    if model_type == "unigram":
      # sentencepiece 0.2.3's suffix-array seed extractor finds almost no whole words in a small,
      # repetitive corpus (300 synthetic captions end as "c an", "s ee"): count the seeds here.
      seeds = os.path.join(tmp, "seeds.tsv")
      with open(seeds, "w", encoding="utf-8") as f:
        f.writelines(f"{piece}\t{count}\n" for piece, count in _seed_pieces(texts))
      extra["seed_sentencepieces_file"] = seeds
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=writer, vocab_size=vocab_size,
        model_type=model_type, hard_vocab_limit=False, character_coverage=1.0,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
        minloglevel=2, **extra)
  proto = sp_model.ModelProto.FromString(writer.getvalue())
  proto.trainer_spec.ClearField("seed_sentencepieces_file")
  model = proto.SerializeToString(deterministic=True)
  with open(f"{out_prefix}.model", "wb") as f:
    f.write(model)
  proc = spm.SentencePieceProcessor(model_proto=model)
  with open(f"{out_prefix}.vocab", "w", encoding="utf-8") as f:
    for i in range(proc.get_piece_size()):
      f.write(f"{proc.id_to_piece(i)}\t{proc.get_score(i):g}\n")
  return f"{out_prefix}.model"


def load(path: str):
  """seqio.SentencePieceVocabulary for a model written by `train_spm` (no extra ids)."""
  import seqio  # Imports TensorFlow: keep it out of module import.
  return seqio.SentencePieceVocabulary(path, extra_ids=0)


def pieces(path: str) -> list[str]:
  """The pieces of a SentencePiece model in id order."""
  sp = spm.SentencePieceProcessor(model_file=path)
  return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def check_matches(vocab_path: str, checkpoint_path: str, what: str = "init checkpoint"
                  ) -> str | None:
  """Raises ValueError when the trainer workdir holding `checkpoint_path` (one of its
  checkpoints/<step>/... folders, or the workdir itself) saved a vocabulary other than
  `vocab_path`'s: its token ids would mean other words here. Returns the checkpoint's vocabulary
  file, or None when there is none to compare (e.g. converted public weights)."""
  theirs = os.path.join(layout.locate(checkpoint_path)[0], layout.VOCAB)
  if not os.path.exists(theirs):
    return None
  ours, other = pieces(vocab_path), pieces(theirs)
  if ours != other:
    differ = sum(a != b for a, b in zip(ours, other)) + abs(len(ours) - len(other))
    raise ValueError(
        f"The {what}'s vocabulary {theirs} ({len(other)} pieces) is not this run's "
        f"{vocab_path} ({len(ours)} pieces; {differ} ids differ), so its token ids would mean "
        "other words. Train both on the same vocabulary (for the synthetic world: the same "
        "config.data seed, num_train_images and synthetic_narration, or "
        f"--config.data.vocab={theirs}).")
  return theirs
