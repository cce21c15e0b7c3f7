"""Offline dataset preparation: ImageFolder trees, unlabeled folders and lists, and the embedded synthetic dataset
-> FFCV .beton files.

    python -m dataset_prep synthetic --out data/synthetic
    python -m dataset_prep imagefolder --data /path/to/imagenet --out data/in1k [--classes FILE]
    python -m dataset_prep folder --data DIR | --list FILE --out OUT [--val-fraction F]
"""
from .numba_cache import cache_typed_dict_methods

cache_typed_dict_methods()           # before anything imports ffcv (numba_cache.py: 3 s less per process)

from .writer import PrepError, convert_folder, convert_imagefolder, write_beton  # noqa: F401
from .synthetic import CLASSES, make_image, make_synthetic, write_jpeg_tree  # noqa: F401
