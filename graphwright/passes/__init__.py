"""Rewrite passes. Importing this package registers every pass in ``PASS_REGISTRY``.

Add one import line per pass module below; the recipe machinery finds passes by name there.
"""

from . import noop  # noqa: F401
from . import lowrank_kv  # noqa: F401
from . import fuse_moe  # noqa: F401
from . import steer  # noqa: F401
from . import fastgen, h2o, snapkv, streaming  # noqa: F401
from . import block_sparse, gemfilter, window  # noqa: F401
from . import duo  # noqa: F401
from . import think  # noqa: F401
from . import evict  # noqa: F401
from . import keyformer, scissorhands  # noqa: F401
