"""The ctypes signatures in kernels.py against the `extern "C"` functions of the C++ sources: a
function called with the wrong number or kinds of arguments would read garbage, not fail."""

import ctypes
import re

import pytest

from framework_cpu_kernels import kernels

C_TYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}
BLOCK = re.compile(r'extern "C" \{(.*?)\}  // extern "C"', re.S)
# a definition starts a line (bodies are indented): return type, name, parameters, body
DEFINITION = re.compile(r"^([A-Za-z_][\w ]*?\**)\s*\b(\w+)\(([^()]*)\)\s*\{", re.M)


def c_type(declaration: str):
    """The ctypes type of a C parameter or return type, with or without a parameter name."""
    if "*" in declaration:
        return ctypes.c_void_p
    words = [w for w in declaration.split() if w != "const"]
    if words == ["void"]:
        return None
    return C_TYPES[words[0]]


def prototypes() -> list[tuple[str, list, object]]:
    """(name, argument types, return type) of every extern "C" definition, #if branches included."""
    found = []
    for source in kernels.SOURCES:
        for block in BLOCK.findall(source.read_text()):
            for ret, name, params in DEFINITION.findall(block):
                args = [c_type(p) for p in params.split(",") if p.strip()]
                found.append((name, args, c_type(ret)))
    return found


def test_the_parser_finds_every_kernel_entry_point():
    names = {name for name, _, _ in prototypes()}
    assert names == {f"{base}_{suffix}" for base in kernels.SIGNATURES for suffix in kernels.SUFFIXES.values()}


@pytest.mark.parametrize("name,args,restype", prototypes(), ids=lambda v: v if isinstance(v, str) else "")
def test_ctypes_signature_matches_the_prototype(name, args, restype):
    base, _, suffix = name.rpartition("_")
    assert suffix in kernels.SUFFIXES.values(), f"{name}: no dtype suffix"
    argtypes, declared_restype = kernels.SIGNATURES[base]
    assert len(argtypes) == len(args), f"{name}: ctypes passes {len(argtypes)} arguments, the C++ takes {len(args)}"
    for i, (ours, theirs) in enumerate(zip(argtypes, args)):
        assert ours is theirs, f"{name}: argument {i} is {theirs.__name__} in C++, {ours.__name__} in ctypes"
    assert declared_restype is restype, f"{name}: returns {restype} in C++, {declared_restype} in ctypes"


def test_a_mismatch_is_caught():
    assert c_type("const bf16* x") is ctypes.c_void_p and c_type("int64_t q_stride") is ctypes.c_int64
    assert c_type("int") is ctypes.c_int and c_type("float eps") is ctypes.c_float and c_type("void") is None
    text = 'extern "C" {\nint f_f32(const float* x, int n, float s) { return 0; }\n}  // extern "C"'
    ret, name, params = DEFINITION.findall(BLOCK.findall(text)[0])[0]
    assert (name, [c_type(p) for p in params.split(",")]) == ("f_f32", [ctypes.c_void_p, ctypes.c_int, ctypes.c_float])
