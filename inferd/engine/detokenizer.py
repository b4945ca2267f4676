"""Incremental detokenization: token ids in, text deltas out, with stop strings.

Decoding a request's whole output every step costs O(output length) per token. Instead each step decodes a small
window of ids (the prefix/read offset scheme of vLLM and TGI):

    ids:   ... | prefix_offset ........ read_offset | new ids ... |
                 \\__ already emitted, kept as context__/

    new text = decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

The context tokens make decoders that depend on neighbours (SentencePiece's leading-space rule, byte-level tokens
that carry half a character) produce the same characters they would in a full decode. When the window's text ends
in U+FFFD the newest ids hold an incomplete UTF-8 character (an emoji split across byte-level tokens); nothing is
emitted and the window grows until the character completes, so deltas are always valid text.

Stop strings are searched only in the region that new text could complete. While a request runs, the stream holds
back the last `max(len(stop)) - 1` characters, because they might turn out to be the start of a stop string.
"""

from __future__ import annotations

from inferd.engine.tokenizer import Tokenizer
from inferd.request import SamplingParams

# Prompt tokens kept as decode context for the first output tokens (enough for any decoder's neighbour rules).
NUM_PROMPT_CONTEXT_TOKENS = 6
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """The text of one sequence's output, built a few tokens at a time."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.skip_special_tokens = params.skip_special_tokens
        self.stop_strings: list[str] = list(params.stop or [])
        self.include_stop_str_in_output = params.include_stop_str_in_output
        max_stop_len = max((len(s) for s in self.stop_strings), default=0)
        # Characters withheld from a running stream: a suffix this long may still grow into a stop string.
        self.num_stream_holdback_chars = 0 if self.include_stop_str_in_output else max(max_stop_len - 1, 0)
        self.max_stop_len = max_stop_len

        # Decode window over context ids + output ids.
        context_ids = list(prompt_token_ids[-NUM_PROMPT_CONTEXT_TOKENS:])
        self._window_ids: list[int] = context_ids
        self._prefix_offset = 0
        self._read_offset = len(context_ids)
        self._prefix_text = self._decode(context_ids)

        self.output_token_ids: list[int] = []
        self._text = ""  # complete characters decoded so far (truncated at a stop string)
        self._num_returned_chars = 0  # how much of _text get_next_output_text(delta=True) has handed out
        self.stop_reason: str | None = None  # the stop string that ended the text, once one has
        self._is_flushed = False

    # ------------------------------------------------------------------------------------------- public
    @property
    def output_text(self) -> str:
        """The text so far: complete characters only, never a stop string unless include_stop_str_in_output."""
        return self._text

    @property
    def is_stopped(self) -> bool:
        return self.stop_reason is not None

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Add sampled ids; return the stop string the text now contains (the text is cut there), else None.

        `stop_terminated`: the last id ended the request (EOS or a stop token id); its text is left out unless
        include_stop_str_in_output, as in vLLM, so "<|im_end|>" never shows even with skip_special_tokens=False.
        After a stop string is found, later ids are recorded but add no text.
        """
        self.output_token_ids.extend(new_token_ids)
        if self.is_stopped:
            return None
        ids_to_decode = list(new_token_ids)
        if stop_terminated and ids_to_decode and not self.include_stop_str_in_output:
            ids_to_decode.pop()
        if not ids_to_decode:
            return None
        num_chars_before = len(self._text)
        self._window_ids.extend(ids_to_decode)
        self._text += self._decode_window()
        # min_tokens: a stop string may only end the request once that many tokens exist (the engine's EOS rule).
        if self.stop_strings and len(self.output_token_ids) >= self.params.min_tokens:
            return self._find_stop_string(num_chars_before)
        return None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """For streaming: the text not yet returned (delta) or all of it (not delta).

        While running, the last `max(len(stop)) - 1` characters are withheld. On `finished`, everything is
        released, including an incomplete trailing character (decoded as U+FFFD, exactly as a full decode shows it).
        """
        if finished:
            self._flush()
            num_ready_chars = len(self._text)
        else:
            num_ready_chars = max(len(self._text) - self.num_stream_holdback_chars, 0)
        if not delta:
            return self._text[:num_ready_chars]
        if num_ready_chars <= self._num_returned_chars:
            return ""
        text = self._text[self._num_returned_chars : num_ready_chars]
        self._num_returned_chars = num_ready_chars
        return text

    # ------------------------------------------------------------------------------------------- internals
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_window(self) -> str:
        """New complete characters from the ids after read_offset; advances the window when there are some."""
        window_text = self._decode(self._window_ids[self._prefix_offset :])
        if window_text.endswith(REPLACEMENT_CHAR) or len(window_text) <= len(self._prefix_text):
            # An incomplete character (wait for its remaining bytes) or ids that decode to nothing yet
            # (skipped special tokens): keep the window, emit nothing.
            return ""
        new_text = window_text[len(self._prefix_text) :]
        # The ids just read become the context for the next step.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._window_ids)
        self._prefix_text = self._decode(self._window_ids[self._prefix_offset : self._read_offset])
        self._trim_window()
        return new_text

    def _trim_window(self) -> None:
        # Ids before prefix_offset are never decoded again; drop them so the list stays a few ids long.
        if self._prefix_offset > 64:
            del self._window_ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _flush(self) -> None:
        """At the end: release ids still waiting for the rest of a character, U+FFFD and all."""
        if self._is_flushed or self.is_stopped:
            self._is_flushed = True
            return
        self._is_flushed = True
        if self._read_offset == len(self._window_ids):
            return
        window_text = self._decode(self._window_ids[self._prefix_offset :])
        if len(window_text) > len(self._prefix_text):
            self._text += window_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._window_ids)
        self._prefix_text = ""

    def _find_stop_string(self, num_chars_before: int) -> str | None:
        """Search text that the latest update could have completed; cut the text at the match that completed
        first (earliest end; on a tie the one starting earlier), as token-by-token generation would have."""
        search_from = max(num_chars_before - self.max_stop_len + 1, 0)
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self.stop_strings:
            start = self._text.find(stop, search_from)
            if start != -1 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is None:
            return None
        end, start, stop = best
        self._text = self._text[: end if self.include_stop_str_in_output else start]
        self.stop_reason = stop
        return stop
