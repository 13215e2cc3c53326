"""The exceptions ttsearch raises for bad input. Each message names the file, field or value."""


class TTSearchError(Exception):
    """Base class of ttsearch's own errors."""


class ConfigError(ValueError):
    """A search setting with a bad value; the message names the setting."""


class ModelLoadError(TTSearchError, ValueError):
    """A model directory, config or weight file that cannot be used (corrupt, wrong shape, ...)."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json (or GGUF metadata) names an architecture ttsearch does not implement."""


class KVCacheFullError(TTSearchError, RuntimeError):
    """The KV pool has too few free blocks for the request; nothing was changed."""


class ContextLengthError(TTSearchError, ValueError):
    """A sequence would grow past the model's context length."""


class InvalidTokenError(TTSearchError, ValueError):
    """A token id outside the model's vocabulary."""
