"""Build of anemll_fast._native: the C++17 engine in csrc/ behind a Cython skin.

On macOS the Objective-C++ CoreML backend (csrc/**/*.mm) is compiled into the
same extension; elsewhere it is left out (Core ML does not exist there).
"""
import glob
import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

IS_MACOS = sys.platform == "darwin"
HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


cpp_sources = _rel(p for p in glob.glob(os.path.join(HERE, "csrc", "**", "*.cpp"), recursive=True)
                   if os.sep + "kernels" + os.sep not in p)
kernel_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "kernels", "*.cpp")))
mm_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "**", "*.mm"), recursive=True))


class BuildExt(build_ext):
    """Teaches setuptools' compiler about `.mm` and per-language flags; compiles
    the sources in parallel unless told otherwise (`--parallel`)."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        compiler = self.compiler
        if ".mm" not in compiler.src_extensions:
            compiler.src_extensions.append(".mm")
        original_compile = compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            postargs = list(extra_postargs or [])
            if src.endswith(".mm"):
                # clang takes .mm as Objective-C++ by its extension (a trailing
                # `-x` would not apply to a source named before it).
                postargs += ["-std=c++17", "-fobjc-arc"]
            elif src.endswith((".cpp", ".cc", ".cxx")):
                postargs += ["-std=c++17"]
            return original_compile(obj, src, ext, cc_args, postargs, pp_opts)

        compiler._compile = _compile
        super().build_extensions()


def _platform_flags():
    """(compile args, link args) every extension shares: optimisation, visibility, stripping."""
    compile_args = ["-O3"]
    link_args = []
    # Shipped binaries carry no symbol table (a stripped .so is a fraction of the
    # size); ANEMLL_FAST_KEEP_SYMBOLS=1 keeps them for debugging.
    strip = not os.environ.get("ANEMLL_FAST_KEEP_SYMBOLS")
    if IS_MACOS:
        compile_args += ["-mmacosx-version-min=13.0"]
        if strip:
            link_args += ["-Wl,-x"]  # Apple's ld: drop local symbols (-s is obsolete there)
    else:
        compile_args += ["-fvisibility=hidden"]
        if strip:
            link_args += ["-s"]
    return compile_args, link_args


def _extension():
    sources = ["anemll_fast/_native.pyx"] + cpp_sources
    define_macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    extra_compile_args, extra_link_args = _platform_flags()
    if IS_MACOS:
        sources += mm_sources
        define_macros.append(("ANEMLL_FAST_HAVE_COREML", "1"))
        for framework in ("CoreML", "Foundation", "CoreVideo", "Accelerate"):
            extra_link_args += ["-framework", framework]
    return Extension(
        "anemll_fast._native",
        sources=sources,
        language="c++",
        include_dirs=[os.path.join("csrc"), numpy.get_include()],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )


def _kernels_extension():
    """The reference backend's compressed-weight kernels: a module of their own, with no engine."""
    extra_compile_args, extra_link_args = _platform_flags()
    return Extension(
        "anemll_fast._kernels",
        sources=["anemll_fast/_kernels.pyx"] + kernel_sources,
        language="c++",
        include_dirs=[os.path.join("csrc"), numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )


setup(
    ext_modules=cythonize(
        [_extension(), _kernels_extension()],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "embedsignature": True},
    ),
    cmdclass={"build_ext": BuildExt},
)
