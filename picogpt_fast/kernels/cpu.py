"""Which int8 paths the compile target can run, read from the features Numba compiles for.

Numba compiles for the host CPU's features (or NUMBA_CPU_FEATURES), and keys its on-disk cache by
them, so code chosen here at compile time is only ever loaded on a CPU with the same features. LLVM
reads the features from CPUID and from the state the OS enables (XCR0): a CPU whose OS or hypervisor
does not save AVX-512 or AVX registers does not report those features.
"""

from __future__ import annotations

from functools import cache

from .codes import PATH_AVX2, PATH_PLAIN, PATH_VNNI


@cache
def target_features() -> frozenset[str]:
    """The LLVM feature names Numba compiles for ("avx2", "avxvnni", ...)."""
    import llvmlite.binding as llvm
    import numba
    from numba.core.codegen import get_host_cpu_features

    if not llvm.get_process_triple().startswith(("x86_64", "i386", "i686")):
        return frozenset()
    text = numba.config.CPU_FEATURES or get_host_cpu_features()
    return frozenset(f[1:] for f in text.split(",") if f.startswith("+"))


def paths_for(features) -> tuple[int, ...]:
    """The int8 paths a CPU with these features runs, in increasing order of speed."""
    paths = [PATH_PLAIN]
    if "avx2" in features:
        paths.append(PATH_AVX2)
        if "avxvnni" in features or {"avx512vnni", "avx512vl"} <= set(features):
            paths.append(PATH_VNNI)
    return tuple(paths)


def target_paths() -> tuple[int, ...]:
    return paths_for(target_features())


def choose_path(requested: str | None) -> tuple[int, str | None]:
    """The int8 path to run: the fastest this target has ("auto" or None), or the one requested if
    the target has it, else the fastest it has below it. Returns (path, a one-line notice when the
    request could not be met, else None). ValueError for a name that is not a path."""
    from .codes import PATH_NAME, PATH_NAMES

    have = target_paths()
    if requested in (None, "", "auto"):
        return have[-1], None
    if requested not in PATH_NAMES:
        raise ValueError(f"unknown int8 kernel path {requested!r}; choose auto, {', '.join(PATH_NAMES)}")
    want = PATH_NAMES[requested]
    if want in have:
        return want, None
    got = max(p for p in have if p < want)
    return got, f"this CPU cannot run the {requested} int8 kernels; using {PATH_NAME[got]}"
