#!/usr/bin/env python3
"""Check an ffcv/kornia install made from the offline wheelhouse (copied there as verify.py).

  python verify.py [--manifest manifest.json] [--preflight-only | --plan]

--plan (run by install.sh before installing): resolves the manifest's `install` targets against this
environment and prints the wheel files to install, one per line. The targets are always installed; any
other requirement is left to the host when it already satisfies it (the host's versions are never replaced)
and is taken from the folder otherwise. Ends with 'WHEELHOUSE PLAN FAILED: ...' (exit 1) when a requirement
is neither on the host nor in the folder. install.sh then runs pip with --no-deps, so pip never re-resolves
the host's own packages: a torch environment whose pins are not all met (say setuptools newer than torch
asks for, or CUDA libraries from another source) would otherwise stop the install.

1. preflight: the host's glibc / libstdc++ provide the symbol versions the bundle needs;
2. imports: ffcv, kornia, ffcv.loader.Loader, cv2, PIL;
3. a real round trip: write a 4-image JPEG beton with ffcv's DatasetWriter, read it back
   through Loaders (turbojpeg decode; decode + OpenCV resize), compare pixels;
4. the shared objects mapped into this process (/proc/self/maps): every OpenCV/turbojpeg
   library must come from the wheel's ffcv.libs folder, never from the system.
Ends with one line: 'WHEELHOUSE VERIFY OK ...' or 'WHEELHOUSE VERIFY FAILED: ...' (exit 1).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def mapped_paths() -> list[str]:
    paths = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and ".so" in parts[5]:
                paths.add(parts[5].strip())
    return sorted(paths)


def preflight(manifest: dict) -> list[str]:
    """Problems with the host C/C++ runtime versus what the bundle was linked against."""
    problems = []
    need = manifest.get("host_requires", {})
    libc, ver = platform.libc_ver()
    if "GLIBC" in need and libc == "glibc" and ver and _vkey(ver) < _vkey(need["GLIBC"]):
        problems.append(f"host glibc {ver} < required {need['GLIBC']}")
    if "GLIBCXX" in need:
        try:
            ctypes.CDLL("libstdc++.so.6")
            lib = next(p for p in mapped_paths() if "libstdc++.so" in p)
            have = re.findall(rb"GLIBCXX_(\d+\.\d+(?:\.\d+)?)\x00", Path(lib).read_bytes())
            best = max((_vkey(v.decode()) for v in have), default=())
            if best < _vkey(need["GLIBCXX"]):
                problems.append(f"host libstdc++ ({lib}) provides GLIBCXX up to "
                                f"{'.'.join(map(str, best))} < required {need['GLIBCXX']}")
        except (OSError, StopIteration) as e:
            problems.append(f"cannot inspect host libstdc++.so.6: {e}")
    return problems


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
        from packaging.version import Version
    except ImportError:   # pip vendors it: any environment install.sh can use has pip
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
        from pip._vendor.packaging.version import Version
    return Requirement, canonicalize_name, Version


def wheel_requires(path: Path) -> list[str]:
    """Requires-Dist lines of a wheel file (its METADATA, read without installing)."""
    import email.parser
    import zipfile
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))
    return msg.get_all("Requires-Dist") or []


def plan(manifest: dict, folder: Path, installed: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(wheel files to install, problems). ``installed``: canonical name -> version (default: this env)."""
    import importlib.metadata as md
    Requirement, canon, Version = _packaging()
    if installed is None:
        installed = {}
        for d in md.distributions():
            name = d.metadata["Name"]
            if name:
                installed.setdefault(canon(name), d.version)
    wheels = {canon(w["name"]): w for w in manifest["wheels"]}
    chosen: dict[str, dict] = {}
    problems: list[str] = []
    queue = [(Requirement(r), "the wheelhouse") for r in manifest["install"]]
    targets = {canon(r.name) for r, _ in queue}
    while queue:
        req, parent = queue.pop(0)
        name = canon(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if name in chosen:
            if not req.specifier.contains(Version(chosen[name]["version"]), prereleases=True):
                problems.append(f"{parent} needs {req}, the folder has {name} {chosen[name]['version']}")
            continue
        have = installed.get(name)
        if name not in targets and have is not None and req.specifier.contains(Version(have), prereleases=True):
            continue                                                  # the host's copy stays
        w = wheels.get(name)
        if w is None or not req.specifier.contains(Version(w["version"]), prereleases=True):
            found = f"{name} {have} is installed" if have else f"{name} is not installed"
            problems.append(f"{parent} needs {req}: {found} and the folder has "
                            f"{'no ' + name if w is None else name + ' ' + w['version']} "
                            f"(install it on the host, or rebuild with WITH_HOST_DEPS=1)")
            continue
        chosen[name] = w
        queue += [(Requirement(r), f"{w['name']} {w['version']}") for r in wheel_requires(folder / w["file"])]
    return [w["file"] for w in chosen.values()], problems


def roundtrip(tmp: Path) -> str:
    import numpy as np
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.writer import DatasetWriter

    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w]
    images = []
    for i in range(4):
        img = np.empty((h, w, 3), np.uint8)
        img[..., 0] = 40 + 40 * i
        img[..., 1] = (xx * 3) % 256
        img[..., 2] = (yy * 4) % 256
        images.append(img)

    class DS:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], i

    path = str(tmp / "check.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="jpg", jpeg_quality=95), "label": IntField()},
                  num_workers=1).from_indexed_dataset(DS())

    loader = Loader(path, batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    batches = [(np.array(x), np.array(y)) for x, y in loader]
    assert len(batches) == 1, f"expected one batch, got {len(batches)}"
    x, y = batches[0]
    assert x.shape == (4, h, w, 3) and x.dtype == np.uint8, (x.shape, x.dtype)
    assert y.reshape(-1).tolist() == [0, 1, 2, 3], y
    err = max(float(np.abs(x[i].astype(int) - images[i].astype(int)).mean()) for i in range(4))
    assert err < 4.0, f"decoded images differ from the originals (mean abs error {err:.2f})"

    crop = Loader(path, batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                  pipelines={"image": [RandomResizedCropRGBImageDecoder((24, 24))], "label": [IntDecoder()]})
    cx = np.array(next(iter(crop))[0])
    assert cx.shape == (4, 24, 24, 3), cx.shape
    # the red channel is constant per image, so it must survive crop + resize
    for i in range(4):
        assert abs(float(cx[i, ..., 0].mean()) - (40 + 40 * i)) < 6, (i, float(cx[i, ..., 0].mean()))
    return f"decoded 4 JPEGs (mean abs err {err:.2f}) and 4 resized crops"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", type=Path, default=Path(__file__).with_name("manifest.json"))
    ap.add_argument("--preflight-only", action="store_true")
    ap.add_argument("--plan", action="store_true", help="print the wheel files to install, one per line")
    a = ap.parse_args()
    manifest = json.loads(a.manifest.read_text()) if a.manifest.exists() else {}
    if a.plan:
        files, problems = plan(manifest, a.manifest.parent)
        for p in problems:
            print(f"WHEELHOUSE PLAN FAILED: {p}", file=sys.stderr)
        print("\n".join(files))
        return 1 if problems else 0
    print(f"python {platform.python_version()} ({sys.executable})")

    problems = preflight(manifest)
    for p in problems:
        print(f"preflight: {p}")
    if a.preflight_only:
        print("WHEELHOUSE PREFLIGHT", "FAILED" if problems else "OK")
        return 1 if problems else 0

    step = "imports"
    try:
        import torch
        import cv2  # noqa: F401  (ffcv.fields.rgb_image needs it; the host's opencv-python[-headless])
        import PIL  # noqa: F401
        import ffcv
        import kornia
        from ffcv.loader import Loader  # noqa: F401
        import ffcv._libffcv as ext
        print(f"torch {torch.__version__}, ffcv {ffcv.__version__} ({ext.__file__}), kornia {kornia.__version__}")
        step = "decode"
        with tempfile.TemporaryDirectory() as tmp:
            detail = roundtrip(Path(tmp))
        print(detail)
        step = "library check"
        libs_dir = os.path.realpath(os.path.join(os.path.dirname(ext.__file__), "..", "ffcv.libs"))
        maps = mapped_paths()
        bundled = [p for p in maps if os.path.realpath(p).startswith(libs_dir + os.sep)]
        foreign = [p for p in maps if re.search(r"libopencv_|libturbojpeg", os.path.basename(p))
                   and p not in bundled]
        print("mapped from the bundle:")
        for p in bundled:
            print(f"  {p}")
        if foreign:
            raise AssertionError(f"OpenCV/turbojpeg mapped from outside the bundle: {foreign}")
        if not any("libturbojpeg" in p for p in bundled) or not any("libopencv_core" in p for p in bundled):
            raise AssertionError("bundled libturbojpeg/libopencv_core are not mapped")
    except Exception as e:  # noqa: BLE001 - report any failure on one line
        for p in problems:
            print(f"hint: {p}")
        print(f"WHEELHOUSE VERIFY FAILED ({step}): {type(e).__name__}: {e}", flush=True)
        return 1
    print(f"WHEELHOUSE VERIFY OK: ffcv + kornia import, beton write/read works, "
          f"{len(bundled)} bundled libraries mapped, no system OpenCV/turbojpeg", flush=True)
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)   # skip numba's noisy finalizers at interpreter exit (docs/notes.md)
