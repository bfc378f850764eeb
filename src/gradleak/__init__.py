"""gradleak: how much private text leaks from transformer gradients, and what stopping it costs."""

from gradleak.errors import GradleakError

__version__ = "0.1.0"
__all__ = ["GradleakError", "__version__"]
