"""The phantom: a structural causal model of PA chest radiographs.

``PHANTOM_VERSION`` is stamped into every generated ``dataset.json`` and every cache
key that depends on the rendered images; ``REGIMES`` are the looks it can render
(``realistic``, the default, and the earlier ``easy`` look kept for regression).
"""

PHANTOM_VERSION = 2
REGIMES = ("realistic", "easy")
DEFAULT_REGIME = "realistic"
