"""The on-device agent: verified installs, local inference, prediction log, telemetry.

Importing ``agent`` is light: onnxruntime, LiteRT, FastAPI and paho are imported only when
a model is opened, the API is created or the daemon runs. Nothing here imports the
toolchain (scikit-learn, skl2onnx, tensorflow, onnx).
"""

from .app import create_app
from .config import AgentConfig, example_config, load_config, parse_config
from .daemon import Agent, run_agent
from .errors import (
    AgentError,
    ConfigError,
    InferenceError,
    InputError,
    ModelError,
    ModelLoadError,
    NoModelError,
    RuntimeUnavailableError,
    SlotError,
)
from .events import InstallEvent, PredictionEvent, PredictionObserver
from .installer import Installer
from .prediction_log import PredictionLog
from .predictor import Predictor, PredictResult
from .runtimes import Runtime, open_runtime, runtime_versions
from .slots import Slots

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentError",
    "ConfigError",
    "InferenceError",
    "InputError",
    "InstallEvent",
    "Installer",
    "ModelError",
    "ModelLoadError",
    "NoModelError",
    "PredictResult",
    "PredictionEvent",
    "PredictionLog",
    "PredictionObserver",
    "Predictor",
    "Runtime",
    "RuntimeUnavailableError",
    "SlotError",
    "Slots",
    "create_app",
    "example_config",
    "load_config",
    "open_runtime",
    "parse_config",
    "run_agent",
    "runtime_versions",
]
