"""The sidebar's Kernel choice as users meet it: the compiled cpu kernel by default where it is built,
only kernels that run on this machine offered, the others named with the reason, and a link asking
for one that cannot run here answered with a warning, not an error page. The Speed page's benchmark
buttons wait for a cpu kernel that runs."""
import pytest
import torch

from sam_viz.sparse_ops import cpu
from test_app import PROMPT, open_app, run_db  # noqa: F401 - run_db: the autouse fixture

NO_GPU = "it needs a CUDA GPU and torch finds none here (TRITON_INTERPRET=1 runs it slowly on the CPU)"


@pytest.fixture
def no_gpu(monkeypatch):
    """A CPU machine without Triton's interpreter (the tests set TRITON_INTERPRET=1 to run triton)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def sidebar_captions(at) -> list[str]:
    return [c.value for c in at.sidebar.caption]


def test_the_default_kernel_is_cpu_and_triton_is_named_not_offered(no_gpu):
    cpu.extension()                                                    # `make` builds it before the tests
    at = open_app(model="tiny-llama", prompt=PROMPT)
    assert not at.exception and not at.error and not at.warning
    assert at.selectbox(key="kernel").options == ["reference", "cpu"]
    assert at.session_state["ctx"].spec.kernel == "cpu" and at.selectbox(key="kernel").value == "cpu"
    assert f"Not offered here: `triton` ({NO_GPU})." in sidebar_captions(at)


def test_a_link_asking_for_triton_without_a_gpu_gets_a_warning_not_an_error(no_gpu):
    cpu.extension()
    at = open_app("compare", model="tiny-llama", prompt=PROMPT, kernel="triton")
    assert not at.exception and not at.error
    assert [w.value for w in at.warning] == [
        f"The link's kernel 'triton' is not one this app can use ({NO_GPU}); showing kernel cpu."]
    assert at.session_state["ctx"].spec.kernel == "cpu"


def test_without_a_cpu_kernel_reference_is_the_default_and_benchmarks_wait(no_gpu, monkeypatch):
    why = "it needs a C++ compiler to build, and 'c++' is not on the PATH"
    monkeypatch.setattr(cpu, "readiness", lambda: ("unavailable", why))
    at = open_app("speed", model="tiny-llama", prompt=PROMPT)
    assert not at.exception and not at.error
    assert at.selectbox(key="kernel").options == ["reference"] and at.session_state["ctx"].spec.kernel == "reference"
    assert f"Not offered here: `cpu` ({why}); `triton` ({NO_GPU})." in sidebar_captions(at)
    buttons = [b for b in at.button if b.label.startswith("Run ")]
    assert len(buttons) == 2 and all(b.disabled for b in buttons)
    assert any(why in i.value for i in at.info)
