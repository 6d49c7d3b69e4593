"""The process's stdout and stderr stay open while llama-cpp-python loads a model."""

from __future__ import annotations


def keep_stdio() -> None:
    """Stops llama-cpp-python from pointing file descriptors 1 and 2 at /dev/null while it
    loads a model (its `verbose=False`). That redirection is process-wide: with a model
    loading beside models that serve (llamad.models), every other thread's journal lines,
    a request's own log line among them, vanished for the length of the load. llama.cpp's
    lines reach structlog through the log callback, so there is nothing to silence."""
    import llama_cpp._internals
    import llama_cpp.llama

    for module in (llama_cpp.llama, llama_cpp._internals):
        module.suppress_stdout_stderr = _Unsilenced  # type: ignore[attr-defined]


class _Unsilenced:
    def __init__(self, disable: bool = True):
        pass

    def __enter__(self) -> "_Unsilenced":
        return self

    def __exit__(self, *exc: object) -> None:
        return None
