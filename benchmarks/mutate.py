"""Mutation testing: plant known bugs one at a time and check the tests catch them.

A fixed list of mutations, each an exact text replacement in one source
file (the text must occur exactly once). The repository is copied once to a
scratch folder (``/tmp`` by default; ``.git`` and virtual environments left
out); each mutant is written there, the named tests run against it
(``pytest -x -q -p no:cacheprovider -m "not slow"``, ``OMP_NUM_THREADS=1``,
``PYTHONPATH`` = the copy's ``src``), and the file is put back. A mutant is
*killed* when pytest reports a failing test; a collection error or an
interrupted run counts as an error, not a kill. The tests run are those that
``.ci/run`` runs (``slow`` ones are deselected), so every kill is one CI sees.

Before the mutants, the union of the named tests runs once on the unmutated
copy: a failure there stops the run (a kill must be the mutation's doing).

Usage::

    python benchmarks/mutate.py [--only NAME ...] [--json out.json] [--markdown out.md]

Prints one JSON object (``mutations``: name, file, killed, killing_test,
seconds, ...). It is a tool to run by hand after changing tests or code, not
a CI step: it runs pytest once per mutation (~10 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".ci-venv", "__pycache__", "*.egg-info", ".pytest_cache",
                              "camanim_out", "lightning_logs")


@dataclass(frozen=True)
class Mutation:
    """One planted bug: replace ``old`` by ``new`` in ``file``; ``tests`` should fail."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str = ""


G = "src/camanim/core/guard.py"
SISE = "src/camanim/methods/sise.py"
ROAD = "src/camanim/metrics/road.py"
MAPS = "src/camanim/core/maps.py"
GUARD_TESTS = ("tests/test_guard.py",)

MUTATIONS: tuple[Mutation, ...] = (
    # ---------------------------------------------------------------- SISE
    Mutation("sise: no area normalization", SISE,
             "                    sc = sc / (mask_areas(m) + MASK_EPS)\n",
             "                    pass\n",
             ("tests/test_sise_reference.py",)),
    Mutation("sise: input not masked", SISE,
             "masked = (x[ii].to(num.dtype) * m[:, None]).to(x.dtype)",
             "masked = x[ii]",
             ("tests/test_sise_reference.py",)),
    Mutation("sise: fusion without the Otsu mask", SISE,
             "step = (fused + v) * otsu_binarize(v, bins, 0.0, 1.0, soft=soft, "
             "temperature=temperature)",
             "step = (fused + v)",
             ("tests/test_seed_methods.py::test_fusion_follows_the_formula_on_hand_made_maps",)),
    # ---------------------------------------------------------- checkpoint
    Mutation("cli: --checkpoint not loaded", "src/camanim/cli/models.py",
             "    model.load_state_dict(sd)\n    return model\n",
             "    return model\n",
             ("tests/test_cli_checkpoint.py",)),
    # --------------------------------------------------------------- guard
    Mutation("guard: torch RNG not restored", G,
             "with saved_modes(model), torch.random.fork_rng(devices=_cuda_devices(model)):",
             "with saved_modes(model):", GUARD_TESTS),
    Mutation("guard: CUDA RNG not restored", G,
             "torch.random.fork_rng(devices=_cuda_devices(model))",
             "torch.random.fork_rng(devices=[])", GUARD_TESTS),
    Mutation("guard: numpy RNG not restored", G,
             "        np.random.set_state(np_state)\n", "", GUARD_TESTS),
    Mutation("guard: Python random not restored", G,
             "        random.setstate(py_state)\n", "", GUARD_TESTS),
    Mutation("guard: training modes not restored", G,
             "with saved_modes(model), torch.random",
             "with contextlib.nullcontext(), torch.random", GUARD_TESTS),
    Mutation("guard: requires_grad not restored", G,
             "                p.requires_grad_(req)\n", "                pass\n", GUARD_TESTS),
    Mutation("guard: .grad not restored", G,
             "                p.grad = grad\n", "                pass\n", GUARD_TESTS),
    Mutation("guard: hooks left behind", G,
             "                    del d[k]\n", "                    pass\n", GUARD_TESTS),
    Mutation("guard: thread count not restored", G,
             "            torch.set_num_threads(threads)\n", "            pass\n", GUARD_TESTS),
    Mutation("guard: in-place change not reported", G,
             "        if changed:\n", "        if False:\n", GUARD_TESTS),
    # ----------------------------------------------------------- rendering
    Mutation("render: frames rendered eagerly", "src/camanim/viz/render.py",
             "    for frames in r.iter_layers():\n",
             "    for frames in list(r.iter_layers()):\n",
             ("tests/test_render.py::test_frames_stream_lazily",)),
    # ----------------------------------------------------------------- DDP
    Mutation("ddp: noise keyed on the share's own layer index",
             "src/camanim/lightning/distributed.py",
             "targets=targets, layer_ids=idx, **road_kw)", "targets=targets, **road_kw)",
             ("tests/test_ddp_shares.py",)),
    Mutation("ddp: rank zero keeps only its own share", "src/camanim/lightning/callback.py",
             "            shares = [s for _, s in gathered]\n", "",
             ("tests/test_ddp_shares.py",)),
    # ---------------------------------------------------------------- ROAD
    Mutation("road: percentile counted from the other end", ROAD,
             "        vi = (n - 1) * (p / 100)\n", "        vi = (n - 1) * (1 - p / 100)\n",
             # a symmetric set (20, 40, 60, 80) hides it: the combined score is a mean
             ("tests/test_road.py::test_percentile_is_the_share_kept_per_percentile_against"
              "_reference",)),
    Mutation("road: ties at the threshold kept", ROAD,
             "out.append(flat[None] < thr.T[:, :, None])",
             "out.append(flat[None] <= thr.T[:, :, None])",
             ("tests/test_road.py::test_equals_roadcombined_per_layer_softmax",)),
    # ------------------------------------------------------- normalization
    Mutation("maps: local not min-maxed again after resizing", MAPS,
             "                m = minmax(m)\n            yield m\n",
             "                pass\n            yield m\n",
             ("tests/test_engine.py::test_local_global_none_normalizations",)),
    Mutation("maps: global uses each layer's own range", MAPS,
             '        if normalization == "global":\n            lo = torch.stack',
             '        if normalization == "global-off":\n            lo = torch.stack',
             ("tests/test_engine.py::test_global_normalization_divides_by_the_max_over_layers"
              "_of_each_image",)),
    # ------------------------------------------------------- atomic writes
    Mutation("files: temporary left behind on error", "src/camanim/core/files.py",
             "    except BaseException:\n        _remove(tmp)\n        raise\n",
             "    except BaseException:\n        raise\n",
             ("tests/test_faults.py::test_atomic_path_cleans_up_on_error",)),
    # ----------------------------------------------------------- Score-CAM
    Mutation("scorecam: input not masked", "src/camanim/methods/scorecam.py",
             "out = ctx.model((ctx.images[i][None] * m[:, None]).to(dtype))",
             "out = ctx.model(ctx.images[i][None].expand(len(m), -1, -1, -1).to(dtype))",
             ("tests/test_equivalence.py::test_perturbation_methods_match_reference",)),
    # ----------------------------------------------------------------- HOG
    Mutation("hog: votes not split between bins", "src/camanim/metrics/sanity.py",
             "votes.scatter_add_(-1, lo_i[..., None], (mag * (1 - frac))[..., None])\n"
             "    votes.scatter_add_(-1, hi_i[..., None], (mag * frac)[..., None])\n",
             "votes.scatter_add_(-1, torch.where(frac < 0.5, lo_i, hi_i)[..., None], "
             "mag[..., None])\n",
             ("tests/test_hog_reference.py",)),
)


@dataclass
class Result:
    name: str
    file: str
    tests: list[str]
    killed: bool
    status: str                 # killed | survived | error
    killing_test: str | None
    seconds: float
    tail: list[str] = field(default_factory=list)


def pytest_cmd(tests: tuple[str, ...] | list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
            "-m", "not slow", *tests]


def run_tests(copy: Path, tests: tuple[str, ...] | list[str],
              timeout: float) -> tuple[int, str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(copy / "src"),
               PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(pytest_cmd(tests), cwd=copy, env=env, capture_output=True,
                           text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = -1, f"timeout after {timeout} s\n{e.stdout or ''}"
    return rc, out, time.perf_counter() - t0


def first_failure(output: str) -> str | None:
    m = re.search(r"^FAILED (\S+)", output, re.M)
    return m.group(1) if m else None


def check_applies(m: Mutation, root: Path) -> str:
    text = (root / m.file).read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"mutation {m.name!r}: the text to replace occurs {n} times in "
                         f"{m.file} (must be once); update the mutation list")
    return text


def run_mutant(m: Mutation, copy: Path, timeout: float) -> Result:
    path = copy / m.file
    original = check_applies(m, copy)
    path.write_text(original.replace(m.old, m.new))
    try:
        rc, out, secs = run_tests(copy, m.tests, timeout)
    finally:
        path.write_text(original)
    killer = first_failure(out) if rc == 1 else None
    status = "killed" if killer else ("survived" if rc == 0 else "error")
    return Result(m.name, m.file, list(m.tests), status == "killed", status, killer,
                  round(secs, 1), [] if killer else out.strip().splitlines()[-5:])


def markdown(results: list[Result]) -> str:
    rows = ["| mutation | file | killed? | killing test |", "|---|---|---|---|"]
    for r in results:
        mark = "yes" if r.killed else f"**no** ({r.status})"
        rows.append(f"| {r.name} | `{r.file.removeprefix('src/camanim/')}` | {mark} | "
                    f"`{r.killing_test or '-'}` |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="run mutations whose name has this")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--markdown", type=Path, default=None, help="write the table here")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS
              if not args.only or any(s.lower() in m.name.lower() for s in args.only)]
    for m in chosen:
        check_applies(m, ROOT)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="camanim-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=SKIP)
        baseline = None
        if not args.no_baseline:
            union = sorted({t for m in chosen for t in m.tests})
            rc, out, secs = run_tests(copy, union, args.timeout)
            baseline = {"passed": rc == 0, "seconds": round(secs, 1)}
            if rc != 0:
                print(out[-3000:], file=sys.stderr)
                raise SystemExit("the named tests fail on the unmutated code; fix that first")
        results = []
        for i, m in enumerate(chosen, 1):
            r = run_mutant(m, copy, args.timeout)
            results.append(r)
            print(f"[{i}/{len(chosen)}] {r.status:8s} {m.name} ({r.seconds} s)", file=sys.stderr)
    report = {"mutations": [asdict(r) for r in results], "baseline": baseline,
              "killed": sum(r.killed for r in results), "total": len(results),
              "seconds": round(time.perf_counter() - t0, 1)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(results))
    return 0 if report["killed"] == report["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
