"""Exceptions that the engine raises for bad input or bad models; the server maps them to status codes."""

from __future__ import annotations


class SpruceError(Exception):
    """Base class of spruce's own errors."""


class InvalidRequestError(SpruceError, ValueError):
    """The request is malformed (empty prompt, max_tokens <= 0, prompt longer than the context, ...)."""


class ModelLoadError(SpruceError, RuntimeError):
    """A model could not be found, verified or loaded."""


class IncompatibleModelsError(ModelLoadError):
    """Target and draft cannot be paired (different vocabularies or tokenizers)."""


class OverloadedError(SpruceError):
    """The request queue is full (or the server is draining): retry later. Distinct from bad input."""


class NotFoundError(SpruceError, LookupError):
    """A named thing (model, request id) does not exist."""


class UnavailableError(SpruceError):
    """The server cannot take requests right now (models loading, shutting down)."""


class DeadlineExceededError(SpruceError, TimeoutError):
    """The request's deadline passed before it finished (it was stopped, its KV freed)."""
