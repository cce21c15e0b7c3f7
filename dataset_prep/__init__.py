"""Offline dataset preparation: ImageFolder trees, unlabeled folders and lists, and the embedded synthetic dataset
-> FFCV .beton files.

    python -m dataset_prep synthetic --out data/synthetic
    python -m dataset_prep imagefolder --data /path/to/imagenet --out data/in1k [--classes FILE]
    python -m dataset_prep folder --data DIR | --list FILE --out OUT [--val-fraction F]

convert.py runs the imagefolder and folder modes: scan.py finds the samples and labels, check.py decodes each image
once, writer.py writes each beton (ffcv_guard.py: what it changes in ffcv's writer), integrity.py records and checks
it; options.py holds the options every mode shares (BetonOptions) and PrepError; synthetic.py the embedded dataset.
"""
from .numba_cache import cache_typed_dict_methods

cache_typed_dict_methods()           # before anything imports ffcv (numba_cache.py: 3 s less per process)

from .options import BetonOptions, PrepError  # noqa: F401
from .convert import convert_folder, convert_imagefolder  # noqa: F401
from .writer import write_beton  # noqa: F401
from .synthetic import CLASSES, make_image, make_synthetic, write_jpeg_tree  # noqa: F401
