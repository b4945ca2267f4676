"""Constrained decoding (layer 2): grammars compiled once per constraint, one matcher per sequence, filling the
per-step token bitmask that the sampler applies (layers/sampler.py). `backend.py` is the only llguidance importer."""

from inferd.structured.backend import CompiledGrammar, GrammarCompiler, GrammarMatcher, bitmask_width

__all__ = ["CompiledGrammar", "GrammarCompiler", "GrammarMatcher", "bitmask_width"]
