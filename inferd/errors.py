"""Layer 0: errors every layer may raise about a user's input.

`InvalidParameterError(param, message)` is a ValueError that names the field at fault, so the HTTP edge reports
`error.param` from it instead of guessing the field from the message's first word.
"""

from __future__ import annotations


class InvalidParameterError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
