"""The machine record beside every result: CPU features that decide matmul speed, told apart per machine."""

from __future__ import annotations

from pathlib import Path

from fintune.provenance import _cpu_features, machine


def test_cpu_features_lists_the_matmul_flags_the_cpu_reports(tmp_path: Path) -> None:
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                   "flags\t\t: fpu sse2 amx_tile avx2 avx512f avx512_bf16 amx_bf16\n", encoding="utf-8")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n", encoding="utf-8")
    assert _cpu_features(str(amx)) == ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    assert _cpu_features(str(plain)) == ["avx2", "avx512f", "avx512_bf16"]  # same model name, no AMX
    assert _cpu_features(str(tmp_path / "absent")) == []
    assert isinstance(machine()["cpu_features"], list)
