#!/usr/bin/env python3
"""Assemble the offline wheelhouse (called by scripts/wheelhouse.sh; stdlib only).

Subcommands:
  repack-ffcv  turn the locally built ffcv wheel into a self-contained one:
               stable-ABI extension renamed to ``_libffcv.abi3.so``, the non-glibc
               shared libraries it links copied into ``ffcv.libs/`` under
               hash-suffixed names, NEEDED/SONAME rewritten and RUNPATH set to
               $ORIGIN-relative paths with patchelf, metadata adjusted.
  finalize     write manifest.json + SHA256SUMS and enforce the size budget.

The pure helpers (name mangling, the system-library rule, wheel naming,
tag compatibility, budget) are unit-tested in tests/test_wheelhouse.py.
"""
from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Libraries every Linux host with a working CPython + torch already has; never bundled.
# glibc's pieces and the GCC runtime (libstdc++/libgcc_s): bundling those is unsafe, as
# the interpreter/torch have already loaded the host copies before ffcv is imported.
SYSTEM_LIB_PREFIXES = (
    "linux-vdso.so", "ld-linux", "libc.so", "libm.so", "libpthread.so", "libdl.so",
    "librt.so", "libutil.so", "libresolv.so", "libnsl.so", "libanl.so",
    "libstdc++.so", "libgcc_s.so",
)
# Symbol-version families that the excluded libraries provide (host requirements).
HOST_VERSION_FAMILIES = ("GLIBC", "GLIBCXX", "CXXABI", "GCC")

LIBS_DIR = "ffcv.libs"
EXT_NAME = "_libffcv.abi3.so"
LOCAL_LABEL = "fastmveb"
ABI3_TAG = "cp38-abi3-linux_x86_64"   # built with -DPy_LIMITED_API=0x03080000
DEFAULT_BUDGET_MIB = 64


# ----------------------------------------------------------------------------- pure helpers
def is_system_lib(soname: str) -> bool:
    """True for libraries taken from the host (glibc set + GCC C++ runtime)."""
    return soname.startswith(SYSTEM_LIB_PREFIXES)


def mangle_soname(soname: str, digest: str) -> str:
    """libopencv_core.so.406 + 'abcdef12...' -> libopencv_core-abcdef12.so.406.

    A unique name means the dynamic linker can never substitute a same-named
    system copy (or one already loaded in the process) for the bundled one.
    """
    stem, sep, rest = soname.partition(".so")
    if not sep:
        raise ValueError(f"not a shared-library name: {soname}")
    return f"{stem}-{digest[:8]}.so{rest}"


def wheel_name_parts(filename: str) -> tuple[str, str, list[str]]:
    """(distribution, version, [tags...]) of a wheel file name (PEP 427)."""
    if not filename.endswith(".whl"):
        raise ValueError(filename)
    parts = filename[:-4].split("-")
    if len(parts) == 6:          # build tag present
        parts = parts[:2] + parts[3:]
    if len(parts) != 5:
        raise ValueError(f"bad wheel name: {filename}")
    dist, ver, py, abi, plat = parts
    tags = [f"{p}-{a}-{pl}" for p in py.split(".") for a in abi.split(".") for pl in plat.split(".")]
    return dist, ver, tags


def wheel_fits_python(filename: str, pyver: str, glibc: tuple[int, int] = (2, 17)) -> bool:
    """Whether a wheel installs on CPython `pyver` (e.g. '3.12') on x86_64 Linux with glibc >= `glibc`.

    Small reimplementation of the tag rules we rely on (no 'packaging' needed on the builder):
    py3/pyXY-none-any, cpXY-cpXY, cpNN-abi3 for NN <= XY, linux_x86_64 and manylinux
    tags up to the given glibc.
    """
    major, minor = (int(x) for x in pyver.split(".")[:2])
    _, _, tags = wheel_name_parts(filename)
    for tag in tags:
        py, abi, plat = tag.split("-")
        m = re.fullmatch(r"(py|cp)(\d)(\d*)", py)
        if not m or int(m.group(2)) != major:
            continue
        pminor = int(m.group(3)) if m.group(3) else None
        if abi == "none":
            if m.group(1) == "cp" and pminor != minor:
                continue
            if m.group(1) == "py" and pminor is not None and pminor > minor:
                continue
        elif abi == "abi3":
            if m.group(1) != "cp" or pminor is None or pminor > minor:
                continue
        elif abi == f"cp{major}{minor}":
            if pminor != minor:
                continue
        else:
            continue
        if plat == "any" or plat == "linux_x86_64":
            return True
        mm = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", plat)
        legacy = {"manylinux1_x86_64": (2, 5), "manylinux2010_x86_64": (2, 12),
                  "manylinux2014_x86_64": (2, 17)}
        need = (int(mm.group(1)), int(mm.group(2))) if mm else legacy.get(plat)
        if need is not None and need <= glibc:
            return True
    return False


def check_budget(sizes: dict[str, int], budget_mib: float) -> tuple[int, bool]:
    """(total bytes, within budget) for a folder listing name -> size."""
    total = sum(sizes.values())
    return total, total <= budget_mib * 1024 * 1024


def max_versions(names: list[str]) -> dict[str, str]:
    """{'GLIBC': '2.34', ...}: highest symbol version per family from names like GLIBC_2.34."""
    best: dict[str, tuple[int, ...]] = {}
    for n in names:
        fam, _, ver = n.partition("_")
        if fam not in HOST_VERSION_FAMILIES or not re.fullmatch(r"[0-9.]+", ver):
            continue
        key = tuple(int(x) for x in ver.split("."))
        if key > best.get(fam, ()):
            best[fam] = key
    return {k: ".".join(map(str, v)) for k, v in sorted(best.items())}


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- ELF helpers
def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def ldd_closure(path: Path) -> dict[str, Path]:
    """soname -> resolved path for every library `path` loads (transitively), via ldd."""
    out = run(["ldd", str(path)])
    libs: dict[str, Path] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(\S+)\s+\(0x", line)
        if m:
            libs[m.group(1)] = Path(m.group(2))
        elif "not found" in line:
            raise SystemExit(f"ldd: unresolved dependency of {path}: {line.strip()}")
    return libs


def needed_versions(path: Path) -> list[str]:
    """Symbol versions this object requires (readelf's version-needs section only)."""
    out = run(["readelf", "-V", "-W", str(path)])
    part = out.split("Version needs section", 1)
    return re.findall(r"Name: (\S+)", part[1]) if len(part) > 1 else []


def debian_package(path: Path) -> str:
    """'libopencv-core406:amd64 4.6.0+dfsg-12' for a file, or '' off Debian."""
    for cand in (path, path.resolve()):
        try:
            pkg = run(["dpkg", "-S", str(cand)]).split(":", 1)[0].strip()
            ver = run(["dpkg-query", "-W", "-f=${Version}", pkg]).strip()
            return f"{pkg} {ver}"
        except (subprocess.CalledProcessError, FileNotFoundError):
            continue
    return ""


# ----------------------------------------------------------------------------- repack
def repack_ffcv(raw_wheel: Path, out_dir: Path, patchelf: str, info_out: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="ffcv-repack-"))
    try:
        with zipfile.ZipFile(raw_wheel) as z:
            z.extractall(work)
        exts = list((work / "ffcv").glob("_libffcv*.so"))
        if len(exts) != 1:
            raise SystemExit(f"expected one ffcv extension in {raw_wheel}, found {exts}")
        ext = work / "ffcv" / EXT_NAME
        exts[0].rename(ext)
        py_syms = sorted(s.split()[-1] for s in run(["nm", "-D", "--undefined-only", str(ext)]).splitlines()
                         if s.split()[-1].startswith(("Py", "_Py")))
        if any(s.startswith("_Py") for s in py_syms):
            raise SystemExit(f"extension uses private CPython symbols {py_syms}: not stable-ABI")

        libdir = work / LIBS_DIR
        libdir.mkdir()
        closure = ldd_closure(ext)
        bundled: dict[str, dict] = {}
        for soname, src in sorted(closure.items()):
            if is_system_lib(soname):
                continue
            real = src.resolve()
            digest = sha256_file(real)
            new = mangle_soname(soname, digest)
            shutil.copyfile(real, libdir / new)
            os.chmod(libdir / new, 0o755)
            bundled[soname] = {"soname": soname, "file": f"{LIBS_DIR}/{new}", "source": str(real),
                               "source_sha256": digest, "debian_package": debian_package(src)}
        rename = {old: Path(b["file"]).name for old, b in bundled.items()}
        # Ship the Debian copyright/licence file of every bundled library next to it.
        for b in bundled.values():
            pkg = b["debian_package"].split(" ")[0].split(":")[0]
            lic = Path("/usr/share/doc") / pkg / "copyright"
            if pkg and lic.is_file():
                (libdir / "licenses").mkdir(exist_ok=True)
                shutil.copyfile(lic, libdir / "licenses" / f"{pkg}.copyright")
                b["license_file"] = f"{LIBS_DIR}/licenses/{pkg}.copyright"

        def patch(obj: Path, runpath: str, soname: str | None = None) -> None:
            for dep in run([patchelf, "--print-needed", str(obj)]).split():
                if dep in rename:
                    run([patchelf, "--replace-needed", dep, rename[dep], str(obj)])
            if soname:
                run([patchelf, "--set-soname", soname, str(obj)])
            run([patchelf, "--set-rpath", runpath, str(obj)])

        patch(ext, f"$ORIGIN/../{LIBS_DIR}")
        for old, b in bundled.items():
            patch(work / b["file"], "$ORIGIN", Path(b["file"]).name)

        # What the host must still provide (excluded libs' symbol versions).
        versions: list[str] = []
        for obj in [ext, *(work / b["file"] for b in bundled.values())]:
            versions += needed_versions(obj)
        host_requires = max_versions(versions)

        # The patched tree must resolve entirely inside itself (plus host system libs).
        for soname, path in ldd_closure(ext).items():
            if not is_system_lib(soname) and libdir.resolve() not in path.resolve().parents:
                raise SystemExit(f"after patching, {soname} still resolves outside the bundle: {path}")

        # Metadata: new version (local label), drop the hard 'opencv-python' requirement
        # (any cv2 provider works; GPU hosts carry opencv-python-headless), new tag.
        old_di = next(work.glob("ffcv-*.dist-info"))
        version = f"1.0.2+{LOCAL_LABEL}"
        new_di = work / f"ffcv-{version}.dist-info"
        old_di.rename(new_di)
        meta = (new_di / "METADATA").read_text()
        meta = re.sub(r"(?m)^Version: .*$", f"Version: {version}", meta, count=1)
        meta = re.sub(r"(?m)^Requires-Dist: opencv-python\s*\n", "", meta)
        (new_di / "METADATA").write_text(meta)
        (new_di / "WHEEL").write_text(
            "Wheel-Version: 1.0\nGenerator: fastmveb scripts/wheelhouse_build.py\n"
            f"Root-Is-Purelib: false\nTag: {ABI3_TAG}\n")
        for junk in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
            (new_di / junk).unlink(missing_ok=True)

        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"ffcv-{version}-{ABI3_TAG}.whl"
        files = sorted(p for p in work.rglob("*") if p.is_file())
        record = io.StringIO()
        writer = csv.writer(record, lineterminator="\n")
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            for p in files:
                rel = p.relative_to(work).as_posix()
                data = p.read_bytes()
                z.writestr(_zinfo(rel, p), data)
                writer.writerow([rel, record_hash(data), len(data)])
            rec_name = f"{new_di.name}/RECORD"
            writer.writerow([rec_name, "", ""])
            z.writestr(_zinfo(rec_name, None), record.getvalue())
        info = {"wheel": target.name, "version": version, "tag": ABI3_TAG,
                "extension": f"ffcv/{EXT_NAME}", "python_symbols": py_syms,
                "bundled_libs": list(bundled.values()),
                "excluded_host_libs": sorted(s for s in closure if is_system_lib(s)),
                "host_requires": host_requires}
        info_out.write_text(json.dumps(info, indent=2))
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _zinfo(name: str, path: Path | None) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))   # reproducible archive
    mode = 0o755 if (path is not None and os.access(path, os.X_OK)) else 0o644
    zi.external_attr = (0o100000 | mode) << 16
    zi.compress_type = zipfile.ZIP_DEFLATED
    return zi


# ----------------------------------------------------------------------------- finalize
def finalize(out: Path, pyver: str, ffcv_info: Path, budget_mib: float, host_deps: bool) -> int:
    info = json.loads(ffcv_info.read_text())
    wheels = sorted(out.glob("*.whl"))
    # manylinux wheels may not ask for a newer glibc than the bundled libraries already do.
    glibc = tuple(int(x) for x in info["host_requires"].get("GLIBC", "2.17").split(".")[:2])
    bad = [w.name for w in wheels if not wheel_fits_python(w.name, pyver, glibc)]
    if bad:
        print(f"ERROR: wheels not installable on CPython {pyver}: {bad}", file=sys.stderr)
        return 1
    entries = []
    for w in wheels:
        dist, ver, tags = wheel_name_parts(w.name)
        entries.append({"file": w.name, "name": dist, "version": ver, "tags": tags,
                        "size": w.stat().st_size, "sha256": sha256_file(w)})
    # Top-level requirements install.sh asks pip for (deps resolve inside the folder).
    wanted = {"ffcv", "kornia"} | ({"numba", "opencv_python_headless", "pillow"} if host_deps else set())
    install = [f"{e['name'].replace('_', '-')}=={e['version']}" for e in entries
               if e["name"].lower() in wanted]
    manifest = {
        "format": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target_python": pyver,
        "budget_mib": budget_mib,
        "builder": {"python": platform.python_version(), "glibc": "-".join(platform.libc_ver()),
                    "os": _os_release()},
        "install": install,
        "expected_on_host": ([] if host_deps else
                             ["torch", "numpy", "numba", "cv2 (opencv-python[-headless])", "PIL (pillow)"]),
        "ffcv": {k: info[k] for k in ("wheel", "version", "tag", "extension", "python_symbols",
                                        "bundled_libs", "excluded_host_libs")},
        "host_requires": info["host_requires"],
        "wheels": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != "SHA256SUMS")
    (out / "SHA256SUMS").write_text("".join(f"{sha256_file(p)}  {p.name}\n" for p in files))
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    total, ok = check_budget(sizes, budget_mib)
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"  {size / 2**20:8.2f} MiB  {name}")
    print(f"wheelhouse {out}: {total / 2**20:.2f} MiB total ({total} bytes), budget {budget_mib} MiB"
          f" -> {'OK' if ok else 'OVER BUDGET'}")
    return 0 if ok else 2


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("repack-ffcv")
    r.add_argument("raw_wheel", type=Path)
    r.add_argument("out_dir", type=Path)
    r.add_argument("--patchelf", required=True)
    r.add_argument("--info", type=Path, required=True)
    f = sub.add_parser("finalize")
    f.add_argument("out", type=Path)
    f.add_argument("--pyver", required=True)
    f.add_argument("--ffcv-info", type=Path, required=True)
    f.add_argument("--budget-mib", type=float, default=DEFAULT_BUDGET_MIB)
    f.add_argument("--host-deps", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "repack-ffcv":
        print(repack_ffcv(a.raw_wheel, a.out_dir, a.patchelf, a.info))
        return 0
    return finalize(a.out, a.pyver, a.ffcv_info, a.budget_mib, a.host_deps)


if __name__ == "__main__":
    sys.exit(main())
