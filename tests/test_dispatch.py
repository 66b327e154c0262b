"""The declarative backend table of diffkern._dispatch on a toy operator: the spelling a new
family uses (see the module docstring), the reasons built from declarations, the finish step."""

import pytest
import torch

import diffkern
from diffkern import _dispatch
from diffkern._dispatch import Operator
from diffkern.ops._checks import FAST_DTYPES

from conftest import need


def _reference(x, scale, *, extra=0.0):
    return x * scale + extra


def test_reference_only_spelling_of_a_new_family():
    """``Operator(name, device_of_fn); op.register("reference")(fn); op(...)`` keeps working."""
    op = Operator("toy_reference_only", lambda x, scale, **kw: x.device)
    op.register("reference")(_reference)
    x = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(op(x, 2.0, extra=1.0), torch.full((3,), 3.0, dtype=torch.float64))
    assert op.backends == ("reference",) and _dispatch.OPERATORS["toy_reference_only"] is op
    with diffkern.use_backend("cpu"), pytest.raises(diffkern.BackendError, match="has no cpu implementation"):
        op(x, 2.0)


def test_declared_needs_become_reasons():
    op = Operator("toy_declared", device_of="x")
    op.register("reference")(_reference)
    op.register("cpu", lambda x, scale, extra=0.0: (x.float() * scale, "raw"), dtypes={"x": FAST_DTYPES},
                finish=lambda raw, x, scale, extra=0.0: raw[0] + extra)
    op.register("triton", "diffkern_no_such_module_xyz:fn", dtypes={"x": FAST_DTYPES})
    need("cpu")
    x64 = torch.ones(2, dtype=torch.float64)
    assert op.reasons("cpu", x64, 2.0) == ["x dtype torch.float64 is not supported (float32, float16, bfloat16)"]
    assert op.select(x64, 2.0) == "reference"                      # automatic: the cpu backend declines
    assert op.select(torch.ones(2), 2.0) == "cpu"
    torch.testing.assert_close(op(torch.ones(2), 2.0, extra=1.0), torch.full((2,), 3.0))   # finish ran
    with diffkern.use_backend("cpu"), pytest.raises(diffkern.BackendError, match="(?s)'cpu'.*x dtype torch.float64"):
        op(x64, 2.0)
    if diffkern.backends()["triton"]:
        assert op.reasons("triton", torch.ones(2), 2.0)[0].startswith("diffkern_no_such_module_xyz failed to import")


def test_compiled_op_and_list_argument_needs():
    op = Operator("toy_compiled", device_of="xs")
    op.register("reference")(lambda xs, w: sum(x * w for x in xs))
    op.register("cpu", lambda xs, w: None, compiled="toy_kernel_that_was_never_built", dtypes={"xs": FAST_DTYPES})
    need("cpu")
    xs = [torch.ones(2), torch.ones(2, dtype=torch.float64)]
    assert op.reasons("cpu", xs, 1.0) == ["diffkern._C has no toy_kernel_that_was_never_built (rebuild the extension)"]
    op.impls["cpu"].compiled = "build_info"                          # an op _C does have
    assert op.reasons("cpu", xs, 1.0) == ["xs[1] dtype torch.float64 is not supported (float32, float16, bfloat16)"]
