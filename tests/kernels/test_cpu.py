"""rnnlab/kernels/cpu.py: what this CPU is, for the kernel caches' keys: CPUs of one model name
told apart, with or without /proc/cpuinfo."""

from __future__ import annotations

import shutil

import pytest

from rnnlab.kernels import cpu

HAS_CXX = shutil.which("c++") is not None
ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse2 avx avx2 fma

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse2 avx avx2 fma
"""
ZEN4 = ZEN3.replace("model\t\t: 1", "model\t\t: 17").replace("fma", "fma avx512f avx512bw")


@pytest.fixture
def proc_cpuinfo(tmp_path, monkeypatch):
    """write(text) -> /proc/cpuinfo as `text` (None: no such file) for cpu.py, its caches
    cleared on the way in and out."""
    def write(text: str | None) -> None:
        path = tmp_path / "cpuinfo"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
        monkeypatch.setattr(cpu, "CPUINFO", path)
        cpu.cpuinfo.cache_clear()
        cpu.isa_digest.cache_clear()

    yield write
    cpu.cpuinfo.cache_clear()
    cpu.isa_digest.cache_clear()


def test_cpuinfo_is_the_first_processor_block(proc_cpuinfo):
    proc_cpuinfo(ZEN3.replace("stepping\t: 1\nflags", "stepping\t: 1\nmicrocode\t: 0x1\nflags", 1))
    info = cpu.cpuinfo()
    assert info["model name"] == "AMD EPYC" and info["cpu family"] == "25"
    assert info["flags"] == "fpu sse2 avx avx2 fma" and info["microcode"] == "0x1"
    proc_cpuinfo(None)
    assert cpu.cpuinfo() == {}


def test_one_model_name_two_cpus_two_identities(proc_cpuinfo):
    """'AMD EPYC' covers Zen 2 to Zen 5: the identity holds family, model, stepping and ISA."""
    proc_cpuinfo(ZEN3)
    zen3 = cpu.identity()
    assert zen3 == f"AMD EPYC (family 25 model 1 stepping 1) | isa {cpu.isa_digest()}"
    proc_cpuinfo(ZEN4)
    zen4 = cpu.identity()
    assert zen4.startswith("AMD EPYC (family 25 model 17 stepping 1) | isa ")
    assert zen3.split(" | ")[1] != zen4.split(" | ")[1]  # the flags differ: so does the digest


def test_the_flags_digest_ignores_their_order(proc_cpuinfo):
    proc_cpuinfo(ZEN3)
    before = cpu.isa_digest()
    proc_cpuinfo(ZEN3.replace("fpu sse2 avx avx2 fma", "fma avx2 avx sse2 fpu"))
    assert cpu.isa_digest() == before


def test_without_proc_cpuinfo_the_macro_set_then_the_architecture(proc_cpuinfo, monkeypatch):
    proc_cpuinfo(None)
    digests = []
    for macros in ("#define __AVX2__ 1", "#define __AVX512F__ 1", None):
        monkeypatch.setattr(cpu, "native_macros", lambda m=macros: m)
        cpu.isa_digest.cache_clear()
        digests.append(cpu.isa_digest())
    assert len(set(digests)) == 3
    assert cpu.identity().endswith(f" | isa {digests[-1]}")  # no family: the name and the ISA
    assert "(" not in cpu.identity()


def test_no_compiler_no_macro_set(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert cpu.native_macros() is None


@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler (c++) on PATH")
def test_the_macro_set_names_the_compiler_and_its_flags(monkeypatch):
    monkeypatch.setenv("CXX", "c++")
    plain = cpu.native_macros()
    assert plain is not None and "__VERSION__" in plain
    assert plain.splitlines() == sorted(plain.splitlines())
    monkeypatch.setenv("CXX", "c++ -DRNNLAB_OTHER_FLAGS")
    assert "RNNLAB_OTHER_FLAGS" in cpu.native_macros()
