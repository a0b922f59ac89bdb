import pytest

from midasbench.harness.registry import Registry, UnknownEntryError


def test_register_get_and_list_sorted():
    reg: Registry[int] = Registry("widget")
    reg.register("b")(2)
    reg.register("a")(1)
    assert reg.get("a") == 1
    assert reg.names() == ["a", "b"]
    assert "a" in reg and "c" not in reg


def test_unknown_name_lists_known_entries():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha")(1)
    with pytest.raises(UnknownEntryError, match="unknown widget 'beta'; known widgets: alpha"):
        reg.get("beta")


def test_duplicate_registration_is_an_error():
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(2)


def test_reading_a_config_imports_no_model_audio_or_split_library():
    """Validating a config (every CLI command, every Ray worker) must not pay for torchvision, scipy,
    scikit-learn or the builders' decoders: a fresh interpreter shows what it imports."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from midasbench.harness.config import load_config\n"
        "load_config('synthetic')\n"
        "heavy = ['torchvision', 'scipy', 'sklearn', 'transformers', 'av', 'soundfile', 'PIL', 'ray']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_lazy_registry_loads_its_entries_once_on_first_use():
    from midasbench.harness.registry import Registry

    calls = []
    registry: Registry[int] = Registry("thing", load=lambda: (calls.append(1), registry.register("a")(1)))
    assert calls == []
    assert registry.names() == ["a"] and "a" in registry and registry.get("a") == 1
    assert calls == [1]
