"""The one errors module of the project.

Every error a user can cause derives from `EdgeError`. The CLIs turn an
`EdgeError` into one line on stderr and exit code 2 (``--debug`` shows the
traceback). Chain causes with ``raise ... from e``; never ``assert`` on input.
This module imports nothing heavy: the device side uses it too.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error the tool reports to users."""

    exit_code = 2


class ConfigError(EdgeError):
    """A configuration file or flag is malformed: names the field and the file."""


class DataError(EdgeError):
    """A dataset is missing, unreadable or unusable."""


class ModelError(EdgeError):
    """Unknown model family, corrupt or mismatched checkpoint."""


class CompressionError(EdgeError):
    """Pruning, distillation or QAT could not reach its target."""


class ExportError(EdgeError):
    """ONNX export failed or the export does not match PyTorch."""


class TargetUnavailableError(EdgeError):
    """A target's runtime, converter or hardware is missing (says what to install)."""


class UnknownTargetError(EdgeError):
    """A target name or a precision the target does not support."""


class BuildError(EdgeError):
    """Building an artifact failed."""


class AccuracyGateError(EdgeError):
    """An artifact's accuracy fell more than the budget below the reference."""


class BundleTrustError(EdgeError):
    """A bundle cannot be trusted: hash mismatch, missing file, unknown schema."""


class BrokerError(EdgeError):
    """An MQTT broker cannot be used as given: bad URL or TLS files, refused login, unreachable."""


class AgentError(EdgeError):
    """The device agent cannot run as configured (bad source, credentials...)."""


class GatewayError(EdgeError):
    """The cloud gateway cannot run as configured."""


class BenchError(EdgeError):
    """A benchmark could not run or its inputs are unusable."""
