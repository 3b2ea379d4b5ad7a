"""DeVec Studio core: split task vectors into shared and unique parts (arXiv 2512.22511).

The math (``decompose``, ``pool``, ``taskvec``) imports only torch. Formats, backends and the
app import diffusers / transformers / gradio lazily, inside the functions that need them.
"""

from .pool import METHOD_VERSION, Config, Decomposition, decompose
from .taskvec import Dense, LowRank, TaskVector

__version__ = "0.1.0"
__all__ = ["Config", "Decomposition", "Dense", "LowRank", "METHOD_VERSION", "TaskVector", "decompose"]
