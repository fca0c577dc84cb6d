# cython: language_level=3
"""Thin typed skin over the C++ engine in csrc/."""

cdef extern from "engine/build_info.h" namespace "anemll":
    int kAbiVersion
    bint have_coreml_backend()
    const char* build_description()


ABI_VERSION = kAbiVersion


def build_info():
    """What this native build contains: ABI version, compiler, CoreML backend."""
    return {
        "abi_version": kAbiVersion,
        "compiler": build_description().decode("utf-8", "replace"),
        "coreml_backend": bool(have_coreml_backend()),
    }
