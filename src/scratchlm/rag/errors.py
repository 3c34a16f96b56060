"""The one error type of the rag package."""


class RagError(ValueError):
    """A document, folder or index that cannot be used as asked: one clear line, exit code 2.

    A ValueError, so the CLI (``scratchlm.cli.main``) reports it as a user mistake.
    """
