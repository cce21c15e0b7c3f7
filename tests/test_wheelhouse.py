"""Offline wheelhouse (scripts/wheelhouse.sh, docs/offline_install.md).

Fast tests cover the pure helpers of scripts/wheelhouse_build.py and, when a built
wheelhouse is lying around, its manifest. The slow test builds wheelhouses for 3.12 and
3.11, installs the 3.11 one into a clean venv that only has a simulated "GPU host" set
(torch from the local CPU wheel, numpy, numba, opencv-python-headless, pillow) with no
index at all, and runs the decode check with the system OpenCV/turbojpeg hidden.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("wheelhouse_build", ROOT / "scripts" / "wheelhouse_build.py")
wb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wb)
_vspec = importlib.util.spec_from_file_location("wheelhouse_verify", ROOT / "scripts" / "wheelhouse_verify.py")
wv = importlib.util.module_from_spec(_vspec)
_vspec.loader.exec_module(wv)


# ----------------------------------------------------------------------------- fast
def test_system_lib_rule():
    for name in ("libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2",
                 "libpthread.so.0", "libdl.so.2", "linux-vdso.so.1"):
        assert wb.is_system_lib(name), name
    for name in ("libopencv_core.so.406", "libturbojpeg.so.0", "libz.so.1", "libgfortran.so.5",
                 "libX11.so.6", "libmd.so.0", "libtbb.so.12"):
        assert not wb.is_system_lib(name), name


def test_mangle_soname():
    assert wb.mangle_soname("libopencv_core.so.406", "0123456789abcdef") == "libopencv_core-01234567.so.406"
    assert wb.mangle_soname("libz.so.1", "ffffffff00") == "libz-ffffffff.so.1"
    assert wb.mangle_soname("libfoo.so", "abcdef0123") == "libfoo-abcdef01.so"
    with pytest.raises(ValueError):
        wb.mangle_soname("notalib", "00")


def test_wheel_names_and_python_fit():
    dist, ver, tags = wb.wheel_name_parts(
        "kornia_rs-0.2.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    assert (dist, ver) == ("kornia_rs", "0.2.0") and len(tags) == 2
    fits = wb.wheel_fits_python
    assert fits("kornia_rs-0.2.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "3.12")
    assert not fits("kornia_rs-0.2.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "3.12")
    assert fits("ffcv-1.0.2+fastmveb-cp38-abi3-linux_x86_64.whl", "3.12")
    assert fits("ffcv-1.0.2+fastmveb-cp38-abi3-linux_x86_64.whl", "3.11")
    assert not fits("x-1.0-cp313-abi3-linux_x86_64.whl", "3.12")
    assert fits("terminaltables-3.1.10-py2.py3-none-any.whl", "3.12")
    assert fits("psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.whl", "3.12")
    assert not fits("x-1.0-cp312-cp312-manylinux_2_36_x86_64.whl", "3.12", glibc=(2, 17))
    assert not fits("x-1.0-cp312-cp312-macosx_11_0_arm64.whl", "3.12")
    with pytest.raises(ValueError):
        wb.wheel_name_parts("x-1.0.tar.gz")


def test_budget_and_versions():
    mib = 1024 * 1024
    assert wb.check_budget({"a": 60 * mib, "b": 4 * mib}, 64) == (64 * mib, True)
    assert wb.check_budget({"a": 64 * mib + 1}, 64) == (64 * mib + 1, False)
    got = wb.max_versions(["GLIBC_2.2.5", "GLIBC_2.34", "GLIBC_2.4", "GLIBCXX_3.4.30", "GLIBCXX_3.4.9",
                           "CXXABI_1.3.13", "GCC_3.0", "GFORTRAN_8", "GLIBC_PRIVATE"])
    assert got == {"CXXABI": "1.3.13", "GCC": "3.0", "GLIBC": "2.34", "GLIBCXX": "3.4.30"}


def test_record_hash_format():
    h = wb.record_hash(b"abc")
    assert h.startswith("sha256=") and "=" not in h[7:] and len(h) == 7 + 43


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> dict:
    import zipfile
    file = f"{name}-{version}-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(folder / file, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        z.writestr(f"{name}/__init__.py", "")
    return {"file": file, "name": name, "version": version}


def test_install_plan_keeps_the_hosts_packages(tmp_path):
    """install.sh installs with --no-deps what verify.py --plan picks: the targets always, a dependency only
    when the host lacks it or has a version that does not satisfy it, never one the host already satisfies;
    a dependency neither on the host nor in the folder is named and nothing is installed."""
    wheels = [_fake_wheel(tmp_path, "ffcv", "1.0.2+fastmveb", ["numba", "tqdm>=4.5", "assertpy"]),
              _fake_wheel(tmp_path, "kornia", "0.9.0", ["torch>=2.0", "packaging", "kornia_rs>=0.1",
                                                        'legacy-thing; python_version < "3"']),
              _fake_wheel(tmp_path, "kornia_rs", "0.2.0", []),
              _fake_wheel(tmp_path, "tqdm", "4.70.1", []),
              _fake_wheel(tmp_path, "assertpy", "1.1", []),
              _fake_wheel(tmp_path, "packaging", "26.3", [])]
    manifest = {"install": ["ffcv==1.0.2+fastmveb", "kornia==0.9.0"], "wheels": wheels}
    host = {"torch": "2.11.0", "numba": "0.68.1", "tqdm": "4.1.0", "packaging": "25.0", "setuptools": "84.0",
            "ffcv": "1.0.2"}
    files, problems = wv.plan(manifest, tmp_path, installed=host)
    assert problems == []
    names = {f.split("-")[0] for f in files}
    # ffcv is a target (reinstalled over the host's plain 1.0.2); tqdm 4.1 is too old; packaging 25 stays.
    assert names == {"ffcv", "kornia", "kornia_rs", "tqdm", "assertpy"}
    files, problems = wv.plan(manifest, tmp_path, installed={"torch": "2.11.0"})
    assert len(problems) == 1 and "numba is not installed" in problems[0] and "WITH_HOST_DEPS=1" in problems[0]
    files, problems = wv.plan(manifest, tmp_path, installed={"torch": "1.13.1", "numba": "0.68.1"})
    assert len(problems) == 1 and "torch>=2.0: torch 1.13.1 is installed" in problems[0]


def _built_wheelhouses():
    return [d for d in (ROOT / "wheelhouse", ROOT / "build" / "wh312", ROOT / "build" / "wh311")
            if (d / "manifest.json").exists()]


@pytest.mark.skipif(not _built_wheelhouses(), reason="no built wheelhouse (run make wheelhouse)")
def test_existing_wheelhouse_manifest_consistent():
    for d in _built_wheelhouses():
        m = json.loads((d / "manifest.json").read_text())
        total = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
        if "budget_mib" in m:
            assert total <= m["budget_mib"] * 1024 * 1024, (d, total)
        for e in m["wheels"]:
            p = d / e["file"]
            assert p.stat().st_size == e["size"]
            assert hashlib.sha256(p.read_bytes()).hexdigest() == e["sha256"]
            assert wb.wheel_fits_python(e["file"], m["target_python"])
        assert m["ffcv"]["python_symbols"] == ["PyModule_Create2"]
        assert not any(wb.is_system_lib(b["soname"]) for b in m["ffcv"]["bundled_libs"])
        assert {"libopencv_core.so.406", "libopencv_imgproc.so.406", "libturbojpeg.so.0"} <= {
            b["soname"] for b in m["ffcv"]["bundled_libs"]}
        assert (d / "install.sh").exists() and (d / "verify.py").exists()


# ----------------------------------------------------------------------------- slow
def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


HOST_SET = ["torch==2.13.0+cpu", "numpy==2.4.6", "numba==0.68.1", "llvmlite==0.50.0",
            "opencv-python-headless==5.0.0.93", "pillow==13.0.0"]


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} -> {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_wheelhouse_build_clean_install_decode(tmp_path):
    if sys.platform != "linux":
        pytest.skip("Linux only")
    if not _pypi_reachable():
        pytest.skip("PyPI not reachable: building a wheelhouse needs the registry")
    if not list(Path("/opt/wheels").glob("torch-2.13.0+cpu-cp311-*.whl")):
        pytest.skip("no local CPU torch wheel in /opt/wheels for the clean venv")
    if subprocess.run(["pkg-config", "--exists", "opencv4", "libturbojpeg"]).returncode != 0:
        pytest.skip("libopencv-dev / libturbojpeg0-dev not installed (scripts/system_deps.sh)")
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the clean-install check targets the repo's Python 3.11 venv")

    env = _clean_env()
    # 1. the default target (3.12): builds, fits the budget, every wheel installs on cp312.
    out312, out311 = tmp_path / "wh312", tmp_path / "wh311"
    _run(["bash", "scripts/wheelhouse.sh"], cwd=ROOT, env={**env, "PYVER": "3.12", "OUT": str(out312)})
    _run(["bash", "scripts/wheelhouse.sh"], cwd=ROOT, env={**env, "PYVER": "3.11", "OUT": str(out311)})
    for d, pyver in ((out312, "3.12"), (out311, "3.11")):
        m = json.loads((d / "manifest.json").read_text())
        assert m["target_python"] == pyver
        assert sum(p.stat().st_size for p in d.iterdir()) <= 64 * 1024 * 1024
        assert all(wb.wheel_fits_python(e["file"], pyver) for e in m["wheels"])

    # 2. simulated GPU host: clean venv, torch from the local wheel + what the host preinstalls,
    #    everything installed with --no-index from a cached download folder.
    hostsim = ROOT / "build" / "hostsim-cp311"
    hostsim.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--find-links", "/opt/wheels",
          "-d", str(hostsim), *HOST_SET], env=env)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(hostsim),
          *[r.split("==")[0] for r in HOST_SET]], env=env)

    # 3. install.sh: no index, bundled libraries, verification.
    out = _run(["bash", str(out311 / "install.sh"), "--python", py], env=env)
    assert "WHEELHOUSE VERIFY OK" in out and "WHEELHOUSE INSTALL OK" in out, out
    site = Path(_run([py, "-c", "import ffcv, os; print(os.path.dirname(os.path.dirname(ffcv.__file__)))"]).strip())
    assert str(site).startswith(str(venv))
    assert (site / "ffcv" / "_libffcv.abi3.so").exists() and list((site / "ffcv.libs").glob("libopencv_core-*"))

    # 4. again with the system OpenCV/turbojpeg files hidden (private mount namespace, root only).
    if os.geteuid() == 0 and shutil.which("unshare"):
        script = (
            "for f in /usr/lib/x86_64-linux-gnu/libopencv_*.so.4* /usr/lib/x86_64-linux-gnu/libturbojpeg.so*; do "
            '[ -f "$f" ] && [ ! -L "$f" ] && mount --bind /dev/null "$f"; done; '
            f"{py} -c 'import ctypes; ctypes.CDLL(\"libturbojpeg.so.0\")' 2>/dev/null && echo SYSTEM-STILL-VISIBLE; "
            f"{py} {out311 / 'verify.py'} --manifest {out311 / 'manifest.json'}")
        r = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, env=env)
        if "Operation not permitted" in r.stderr and "WHEELHOUSE" not in r.stdout:
            return  # no mount namespaces in this sandbox; the /proc/self/maps check above stands
        assert "SYSTEM-STILL-VISIBLE" not in r.stdout, r.stdout
        assert "WHEELHOUSE VERIFY OK" in r.stdout, r.stdout + r.stderr
