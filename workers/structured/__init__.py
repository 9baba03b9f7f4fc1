"""Structured outputs: grammar-constrained decoding for the engines (issue 14, item 3), on
llguidance (chosen by measured mask cost: benchmarks/RESULTS.md, "Structured outputs").

    check_constraint(c)                   frontend, before routing: syntax only, no tokenizer
    compiler = GrammarCompiler.from_model_dir(path, vocab_size)   once per model, in the worker
    matcher = compiler.compile(c).matcher()                       once per request
    LogitsMasker(vocab_size).apply(logits, [(row, matcher), ...]) each step (torch executor;
                                                                  workers/structured/logits.py)
    matcher.accept(token)                                         each sampled token
    GrammarTokenChooser(compiled, seed=...).next_token(matcher)   the mocker's token

Everything here but `logits.py` is importable without torch."""

from workers.structured.chooser import GrammarTokenChooser
from workers.structured.compiler import CompiledGrammar, GrammarCompiler
from workers.structured.grammar import check_constraint
from workers.structured.masks import MaskFiller, allocate_bitmask, allowed_token_ids, banned_tokens
from workers.structured.matcher import GrammarMatcher
from workers.structured.vocab import GrammarVocab, load_vocab

__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarMatcher",
    "GrammarTokenChooser",
    "GrammarVocab",
    "MaskFiller",
    "allocate_bitmask",
    "allowed_token_ids",
    "banned_tokens",
    "check_constraint",
    "load_vocab",
]
