"""The one exception type the user sees for bad input.

Every check that rejects a file, flag or field raises `LlamaInputError` with a
single line naming what was wrong and where; the CLIs print that line and exit 2.
"""


class LlamaInputError(ValueError):
    """Bad user input: a missing/partial checkpoint, a mismatched field, an unknown hook point..."""
