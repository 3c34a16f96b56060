"""The one error type of the rag package."""


from ..errors import ScratchLMError


class RagError(ScratchLMError):
    """A document, folder or index that cannot be used as asked: one clear line, exit code 2.

    A ScratchLMError, so the CLI (``scratchlm.cli.main``) reports it as a user mistake.
    """
