"""The one exception type the user sees for bad input, in every package and stage of the project.

Every check that rejects a file, flag or field raises `PipelineInputError` with a single line naming
what was wrong and where; the stage scripts print that line and exit 2 (pipeline.core.cli.run_main). It
lives in llama_3 because that package stands alone and the pipeline builds on it.
"""


class PipelineInputError(ValueError):
    """Bad user input: a missing/partial checkpoint or folder, a mismatched field, an unknown flag value..."""


LlamaInputError = PipelineInputError
"""The earlier name, kept for code written against it."""
