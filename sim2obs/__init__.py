"""sim2obs: close the simulation-to-observation gap for galaxy images.

Forward-model simulated galaxies (IllustrisTNG, EAGLE, a built-in mini-universe) into
survey-realistic cutouts, pretrain encoders on them, and align them to real survey data.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sim2obs")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
