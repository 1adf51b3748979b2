"""Training-time logging of explanations: ``ExplanationLogger`` + sinks (TensorBoard, W&B, MLflow).

Framework callbacks live in ``lumos.track.lightning.LumosCallback`` and ``lumos.track.keras.LumosKerasCallback``
(imported on demand, so neither framework is needed for the rest).
"""

from lumos.track.logger import ExplanationLogger
from lumos.track.sinks import MemorySink, MlflowSink, Sink, TensorBoardSink, WandbSink, make_sink

__all__ = ["ExplanationLogger", "MemorySink", "MlflowSink", "Sink", "TensorBoardSink", "WandbSink", "make_sink"]
