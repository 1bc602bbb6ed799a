"""Shared fixtures. The reference implementations (transformers==5.23.0, torchvision) are imported here
unconditionally: a CI machine without them fails loudly instead of skipping the parity tests."""

import os
import sys

import pytest
import torch
import torchvision  # noqa: F401  (transformers' Molmo2 image processor needs it)
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

assert transformers.__version__ == "5.23.0", f"tests need transformers==5.23.0, found {transformers.__version__}"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def hf_qwen_tokenizer(tmp_path_factory):
    """transformers' Qwen2Tokenizer (used by Qwen3) built from the BPE ranks, with Qwen3's and Molmo2's
    special tokens: the oracle for our tiktoken tokenizer and for the processor's input_ids."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from tokenizers import AddedToken

    import data

    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(data.QWEN_RANKS_PATH)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    specials = sorted(data.SPECIAL_TOKENS.items(), key=lambda kv: kv[1])
    qwen = [AddedToken(t, special=True, normalized=False) for t, i in specials if i < data.MOLMO2_FIRST_ID]
    tok.add_tokens(qwen, special_tokens=True)
    # the ids between 151669 and 151935 are unused rows of Qwen3's embedding table; Molmo2's tokens
    # start at 151936, so pad the added-token table up to there before adding them
    pad = [AddedToken(f"<|unused_{i}|>", special=True, normalized=False) for i in range(len(tok), data.MOLMO2_FIRST_ID)]
    tok.add_tokens(pad, special_tokens=True)
    molmo = [AddedToken(t, special=True, normalized=False) for t, i in specials if i >= data.MOLMO2_FIRST_ID]
    tok.add_tokens(molmo, special_tokens=True)
    for t, i in specials:
        assert tok.convert_tokens_to_ids(t) == i, (t, i, tok.convert_tokens_to_ids(t))
    return tok
