"""The mocker's next token under a grammar: output that ends, and is valid, without a model.

Random allowed tokens do not end (inside a JSON string nearly every token is allowed), so the
chooser walks a witness (witness.py: a small valid instance of the schema, a shortest match of
the regex, one of the choices), tokenized once with the model's tokenizer, and then emits a stop
token. Each token is checked against the matcher; where the witness cannot be built (EBNF
grammars, unsupported schema keywords) or the output has left it (a migrated request whose
previous worker chose differently), it falls back to a search:

1. the grammar can end here: a stop token;
2. the grammar forces tokens: the first of them;
3. the first byte of a shortest way to an end within SEARCH_DEPTH bytes (iterative deepening
   over single-byte tokens, closers such as quotes and brackets tried first, at most
   SEARCH_NODES tokens tried per step);
4. none found: the allowed single-byte token whose byte the output has used least (closers
   first among equals), else the lowest allowed id. Fair choice walks through a grammar's
   alternatives instead of repeating one (`[a-z]+ ">"` reaches the `>`).

Every token emitted is allowed, so the output is always a valid prefix. The witness path ends
in len(witness tokens) + 1 steps. The search ends wherever some end is within SEARCH_DEPTH
bytes of every state it passes through (true of EBNF grammars whose sentences are built from
short pieces); past that, step 4 is a heuristic with no proof of progress, and the request's
max_tokens is what stops it. The search costs up to SEARCH_NODES mask fills a step (~5 ms
on the 8k vocab): only the fallback pays it.
"""

from __future__ import annotations

from workers.structured.compiler import CompiledGrammar
from workers.structured.masks import allocate_bitmask, allowed_token_ids
from workers.structured.matcher import GrammarMatcher
from workers.structured.witness import NoWitness, witness_text

_CLOSERS = b'"}])0a'
# Search order: closers, then printable ASCII, then the rest.
_BYTE_ORDER = tuple(dict.fromkeys([*_CLOSERS, *range(32, 127), *range(256)]))
SEARCH_DEPTH = 4
SEARCH_NODES = 256


class GrammarTokenChooser:
    """Per request. `next_token(matcher)` picks a token the matcher allows; the caller then
    `matcher.accept`s it (and stops the request when it is a stop token)."""

    __slots__ = ("_compiled", "_witness", "_witness_bytes", "_bitmask")

    def __init__(self, compiled: CompiledGrammar, *, seed: int = 0) -> None:
        self._compiled = compiled
        vocab = compiled.vocab
        try:
            text = witness_text(compiled.constraint, seed)
            self._witness: list[int] | None = vocab.encode(text)
            self._witness_bytes = text.encode()
        except NoWitness:
            self._witness = None
            self._witness_bytes = b""
        self._bitmask = allocate_bitmask(1, vocab.vocab_size)

    @property
    def has_witness(self) -> bool:
        return self._witness is not None

    def next_token(self, matcher: GrammarMatcher) -> int:
        if matcher.is_terminated():
            raise ValueError("the matcher has terminated: nothing follows a stop token")
        vocab = self._compiled.vocab
        token = self._from_witness(matcher)
        if token is not None:
            return token
        if matcher.is_accepting():
            return vocab.stop_token_ids[0]
        forced = matcher.forced_token_ids()
        if forced:
            return forced[0]
        token = self._search_exit(matcher)
        if token is not None:
            return token
        byte_tokens = self._byte_tokens_allowed(matcher)
        if byte_tokens:
            used = vocab.decode_bytes(matcher.accepted_ids)
            return min(byte_tokens, key=lambda t: used.count(vocab.decode_bytes([t])))
        matcher.fill_mask(self._bitmask, 0)
        allowed = allowed_token_ids(self._bitmask, 0, vocab.vocab_size)
        if len(allowed) == 0:  # pragma: no cover - fill_mask always leaves the stop tokens
            return vocab.stop_token_ids[0]
        return int(allowed[0])

    def _byte_tokens_allowed(self, matcher: GrammarMatcher) -> list[int]:
        matcher.fill_mask(self._bitmask, 0)
        row = self._bitmask[0]
        out = []
        for byte in _BYTE_ORDER:
            token = self._compiled.vocab.byte_token_ids[byte]
            if token >= 0 and (int(row[token >> 5]) >> (token & 31)) & 1:
                out.append(token)
        return out

    def _search_exit(self, matcher: GrammarMatcher) -> int | None:
        """The first token of a shortest byte path to a state where the grammar can end
        (iterative deepening; None if none within SEARCH_DEPTH bytes and SEARCH_NODES tries)."""
        budget = [SEARCH_NODES]
        candidates = self._byte_tokens_allowed(matcher)
        for depth in range(1, SEARCH_DEPTH + 1):
            for token in candidates:
                if self._ends_within(matcher, token, depth, budget):
                    return token
                if budget[0] <= 0:
                    return None
        return None

    def _ends_within(self, matcher: GrammarMatcher, token: int, depth: int, budget: list[int]) -> bool:
        """Whether, after `token`, the grammar can end within depth - 1 more bytes. The matcher
        is left as it was."""
        if budget[0] <= 0 or not matcher.accept(token):
            return False
        budget[0] -= 1
        try:
            if matcher.is_accepting():
                return True
            return depth > 1 and any(
                self._ends_within(matcher, t, depth - 1, budget) for t in self._byte_tokens_allowed(matcher)
            )
        finally:
            matcher.rollback(1)

    def _from_witness(self, matcher: GrammarMatcher) -> int | None:
        witness = self._witness
        if witness is None:
            return None
        done = matcher.accepted_ids
        n = len(done)
        if n <= len(witness) and witness[:n] == done:
            candidate = witness[n] if n < len(witness) else self._compiled.vocab.stop_token_ids[0]
            return candidate if matcher.is_allowed(candidate) else None
        # Another tokenization of the same prefix (a migrated request): go on from the bytes.
        prefix = self._compiled.vocab.decode_bytes(done)
        if not self._witness_bytes.startswith(prefix):
            return None
        rest = self._witness_bytes[len(prefix) :]
        if not rest:
            stop = self._compiled.vocab.stop_token_ids[0]
            return stop if matcher.is_allowed(stop) else None
        try:
            ids = self._compiled.vocab.encode(rest.decode())
        except UnicodeDecodeError:
            return None
        return ids[0] if ids and matcher.is_allowed(ids[0]) else None
