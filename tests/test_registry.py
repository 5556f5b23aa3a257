import pytest

from kdrun.errors import ConfigError
from kdrun.registry import Registry


def make():
    reg = Registry("widget")

    @reg.register("resnet8")
    def resnet8():
        """A small one.

        More text."""

    @reg.register("resnet26", description="explicit")
    def resnet26():
        pass

    return reg


def test_lookup_and_description():
    reg = make()
    assert reg.get("resnet8").__name__ == "resnet8"
    assert reg.describe("resnet8") == "A small one."
    assert reg.describe("resnet26") == "explicit"
    assert "resnet8" in reg and "nope" not in reg and len(reg) == 2


def test_duplicate_name_is_an_error():
    reg = make()
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("resnet8")(lambda: None)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"unknown widget 'resnet9'; did you mean resnet8"):
        make().get("resnet9")


def test_unknown_name_without_close_match_lists_known():
    with pytest.raises(ConfigError) as exc:
        make().get("transformer")
    assert "did you mean" not in str(exc.value) and "known: resnet26, resnet8" in str(exc.value)


def test_wildcard_list():
    reg = make()
    assert reg.names() == ["resnet26", "resnet8"]
    assert reg.names("resnet2*") == ["resnet26"]


def test_project_registries_are_filled():
    from kdrun.data import DATASETS
    from kdrun.methods import METHODS
    from kdrun.models import MODELS

    assert {"ce", "kd"} <= set(METHODS.names())
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder"} <= set(DATASETS.names())
    assert {"resnet8", "resnet26", "resnet110", "resnet8x4", "resnet32x4"} <= set(MODELS.names())
    for registry in (DATASETS, METHODS, MODELS):
        assert all(registry.describe(n) for n in registry.names()), "every entry has a one-line description"
