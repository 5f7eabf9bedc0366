"""ops.update_center: the DINO centre EMA against its reference, from the teacher itself or from the
teacher column sums that each backend of the fused loss hands over; bad input."""
from __future__ import annotations

import pytest
import torch

from dinocxr_fast import ops
from op_helpers import DINO_TS, DINO_TT, backends, dino_inputs


@pytest.mark.parametrize("backend", backends("torch", "cpp", "triton-interpreter"))
def test_matches_reference_from_the_teacher_and_from_the_fused_sum(backend):
    student, teacher, center = dino_inputs(4, 33, 3)
    expected = ops.update_center_reference(center.clone(), teacher, 0.9)
    got = ops.update_center(center.clone(), teacher, 0.9)
    torch.testing.assert_close(got, expected)
    _, tsum = ops.dino_loss_and_teacher_sum(student, teacher, center, student_temp=DINO_TS, teacher_temp=DINO_TT,
                                            backend=backend.name)
    fused = ops.update_center(center.clone(), teacher, 0.9, teacher_sum=tsum)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


def test_bad_input_raises_value_error_naming_the_argument():
    _, teacher, center = dino_inputs(2, 8, 2)
    with pytest.raises(ValueError, match="center"):
        ops.update_center(center[:-1].clone(), teacher, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ops.update_center(center.clone(), teacher, 1.5)
    with pytest.raises(ValueError, match="teacher_sum"):
        ops.update_center(center.clone(), teacher, 0.9, teacher_sum=torch.zeros(3))
