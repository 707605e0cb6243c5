"""Shared test helpers: a tiny real tokenizer trained in memory (no network)."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


def bpe_tokenizer(texts: list[str], vocab_size: int, eos: bool = False, **kwargs) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` that adds a BOS "<s>" like LLaMA (and has EOS "</s>" if ``eos``)."""
    specials = ["<s>", "</s>"] if eos else ["<s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    if eos:
        kwargs["eos_token"] = "</s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", **kwargs)


SAMPLE_TEXT = (
    " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . "
    "He had a guest @-@ starring role on the television series The Bill in 2000 . "
    "no it was n't black monday but while the new york stock exchange did n't fall apart "
    "the dow jones industrial average plunged N points . The three primary colors are red , blue . "
) * 20


def small_tokenizer() -> PreTrainedTokenizerFast:
    """The data / evaluation tests' tokenizer: vocab 300 over SAMPLE_TEXT, BOS "<s>", max length 128."""
    return bpe_tokenizer([SAMPLE_TEXT], 300, model_max_length=128)
