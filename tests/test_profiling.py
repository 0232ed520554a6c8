from pathlib import Path

import pytest

from drone_hf.profiling import cpu_name


def test_cpu_name_reads_the_model_name_from_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    if not names:
        pytest.skip("no `model name` in /proc/cpuinfo on this machine")
    assert cpu_name().startswith(f"{names[0]} (") and cpu_name().endswith(" cores)")


def test_cpu_name_falls_back_to_platform_without_proc_cpuinfo(monkeypatch):
    import builtins
    import platform

    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    assert cpu_name() == (platform.processor() or platform.machine())
