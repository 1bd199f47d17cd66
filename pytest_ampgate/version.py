"""The package version, in the one module every layer may import (the JSON report names its generator)."""

__version__ = "0.1.0"
