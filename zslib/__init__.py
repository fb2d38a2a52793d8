"""zslib: the library behind the ZeroSearch workbench notebooks."""

import warnings

# Libraries import tqdm.auto, which in a notebook without ipywidgets warns once and then draws text
# bars: those are what the workbench wants (see zslib/progress.py), so the warning is noise.
warnings.filterwarnings("ignore", message="IProgress not found")
