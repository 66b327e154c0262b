"""Optional dependencies fail clearly: without transformers / diffusers the demos end in one line
naming the extra to install, not in a ModuleNotFoundError traceback."""

import sys

import pytest
import torch

from diffkern import _optional, cli


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)   # the demos set their own thread count


@pytest.mark.parametrize("module, argv, extra", [
    ("transformers", ["demo", "poe-bridge", "--num-problems", "1"], "poe"),
    ("diffusers", ["demo", "spectrum"], "spectrum"),
])
def test_demo_without_its_extra_says_what_to_install(monkeypatch, capsys, threads, module, argv, extra):
    monkeypatch.setitem(sys.modules, module, None)          # `import module` now fails as if absent
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    message = str(info.value.code)
    assert f'pip install "diffkern[{extra}]"' in message and module in message
    assert "\n" not in message and "Traceback" not in capsys.readouterr().err


def test_require_names_the_package_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(_optional.MissingDependency, match=r'digits needs scikit-learn.*"diffkern\[spectrum\]"'):
        _optional.require("sklearn.datasets", "digits")
    assert _optional.require("math", "nothing").sqrt(4.0) == 2.0


def test_require_lets_errors_inside_an_installed_package_through(monkeypatch, tmp_path):
    (tmp_path / "dk_fake_extra").mkdir()
    (tmp_path / "dk_fake_extra" / "__init__.py").write_text("import dk_fake_missing_inner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_optional.EXTRAS, "dk_fake_extra", ("dk-fake-extra", "fake"))
    with pytest.raises(ModuleNotFoundError, match="dk_fake_missing_inner") as info:
        _optional.require("dk_fake_extra", "nothing")     # installed, but broken inside: not our line
    assert not isinstance(info.value, _optional.MissingDependency)
