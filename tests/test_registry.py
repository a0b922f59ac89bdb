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
