"""qroar: diagnose and repair RoPE position interpolation + weight quantization (Q-ROAR).

Engine only: never imports streamlit or plotly, so it runs headless on a GPU server.
"""

from qroar.errors import (  # noqa: F401
    Cancelled,
    ConfigError,
    DataError,
    ModelError,
    OutOfMemory,
    QroarError,
    ScalesFileError,
)

__version__ = "0.1.0"
