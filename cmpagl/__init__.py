"""cmpagl: a tested implementation of CMPAGL (Sun et al., IEEE TGRS 2024) for remote-sensing
image-text retrieval.

Nothing happens at import time: sub-modules are imported explicitly by their users.
"""

__version__ = "0.1.0"
