"""Every command and subcommand answers --help (exit 0, a usage line) in a fresh interpreter: a help string with
a bare '%' crashed `python -m dataset_prep imagefolder --help` (argparse formats help with %)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One process walks every command: each main(["--help"]), then main([sub, "--help"]) for each subcommand
# argparse lists as {a,b,...} in its usage (or, for the benchmark runner, its stage list).
WALK = r'''
import contextlib, importlib, io, re, sys
sys.path.insert(0, ".")
COMMANDS = {"dataset_prep": "dataset_prep.__main__", "fastmveb.eval": "fastmveb.eval.__main__",
            "fastmveb.demo": "fastmveb.demo", "fastmveb.export": "fastmveb.export", "fastmveb.report": "fastmveb.report",
            "fastmveb/train.py": "fastmveb.train", "fastmveb.bench": "fastmveb.bench.__main__",
            "fastmveb.bench.gpu_check": "fastmveb.bench.gpu_check"}

def help_of(main, argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    return rc or 0, buf.getvalue()

for name, module in COMMANDS.items():
    main = importlib.import_module(module).main
    rc, text = help_of(main, ["--help"])
    bench_doc = module == "fastmveb.bench.__main__" and "STAGE" in text     # the runner prints its docstring
    print(f"CHECK {name} --help rc={rc} usage={'usage' in text.lower() or bench_doc}")
    subs = []
    m = re.search(r"\{([a-z_,-]+)\}", text)
    if m:
        subs = m.group(1).split(",")
    elif module == "fastmveb.bench.__main__":
        from fastmveb.bench.__main__ import COMMANDS
        subs = COMMANDS
    for sub in subs:
        rc, text = help_of(main, [sub, "--help"])
        ok = "usage" in text.lower() or (sub == "all" and "STAGE" in text)
        print(f"CHECK {name} {sub} --help rc={rc} usage={ok}")
'''


def test_every_command_and_subcommand_answers_help():
    proc = subprocess.run([sys.executable, "-c", WALK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHECK ")]
    bad = [ln for ln in checks if "rc=0 usage=True" not in ln]
    assert not bad, "\n".join(bad)
    names = " ".join(checks)
    # The walk found the subcommands (a regex that matched nothing would pass vacuously).
    for sub in ("dataset_prep imagefolder", "dataset_prep synthetic", "fastmveb.eval knn", "fastmveb.eval linear",
                "fastmveb.bench step", "fastmveb.bench ramp", "fastmveb.bench all", "fastmveb.demo run"):
        assert f"CHECK {sub} --help" in names, sub
    assert len(checks) >= 20


def test_gpu_check_script_help():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--wheelhouse" in proc.stdout
