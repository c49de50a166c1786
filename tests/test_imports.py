"""The packages import without torch and hand on their public names on first use (fastgpt_kernels._lazy)."""
import pytest

from conftest import run_python

pytestmark = pytest.mark.slow  # each test starts a fresh interpreter


def test_the_packages_import_without_torch_and_hand_on_every_public_name():
    result = run_python("""
        import importlib, sys
        import fastgpt, fastgpt.data, fastgpt_kernels
        assert "torch" not in sys.modules, "imported on importing the packages"
        for package in (fastgpt_kernels, fastgpt, fastgpt.data):
            assert package.__all__ == list(package._HOMES)
            for name, home in package._HOMES.items():
                assert name in dir(package), name
                assert getattr(package, name) is getattr(importlib.import_module(home, package.__name__), name), name
            namespace = {}
            exec(f"from {package.__name__} import *", namespace)
            assert set(package.__all__) <= set(namespace)
        assert fastgpt_kernels.reference.layer_norm and fastgpt.data.streaming.prepare_corpus  # submodules
        for package, missing in ((fastgpt_kernels, "no_such_op"), (fastgpt.data, "no_such_name"), (fastgpt, "nothing")):
            try:
                getattr(package, missing)
            except AttributeError as e:
                assert missing in str(e) and package.__name__ in str(e), e
            else:
                raise AssertionError(missing)
        """)
    assert result.returncode == 0, result.stderr


def test_a_name_set_on_a_package_stays_when_its_neighbours_load():
    result = run_python("""
        import fastgpt.data, fastgpt_kernels
        fastgpt_kernels.layer_norm = "mine"
        fastgpt.data.get_batch = "mine too"
        assert callable(fastgpt_kernels.attention) and callable(fastgpt.data.open_corpus)  # same modules
        assert fastgpt_kernels.layer_norm == "mine" and fastgpt.data.get_batch == "mine too"
        """)
    assert result.returncode == 0, result.stderr


def test_every_module_imports_first():
    """No import cycle hides behind the order in which a package used to import its modules: each
    module is the first of fastgpt's that a forked process imports (torch and triton already in)."""
    result = run_python("""
        import importlib, importlib.util, os, sys, traceback
        from pathlib import Path
        import numpy, torch, triton  # noqa: F401  (third-party: loaded once, before the forks)

        names = []
        for package in ("fastgpt_kernels", "fastgpt"):
            root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
            for path in sorted(root.rglob("*.py")):
                parts = (package, *path.relative_to(root).with_suffix("").parts)
                names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        assert not [n for n in sys.modules if n.split(".")[0] in ("fastgpt", "fastgpt_kernels")]
        failed = []
        for name in names:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            if os.waitpid(pid, 0)[1] != 0:
                failed.append(name)
        print(len(names), "modules;", "failed:", failed)
        sys.exit(1 if failed or len(names) < 40 else 0)
        """)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
