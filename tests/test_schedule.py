"""ToMe schedules (tome.md §8, property 2)."""
import pytest

from vitrim.errors import OptionError
from vitrim.methods.tome import parse_schedule


@pytest.mark.parametrize("r,expected", [
    ((16, -1), [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]),
    ((16, -0.5), [24, 22, 21, 19, 18, 16, 15, 13, 12, 10, 9, 8]),
    ((16, 1), [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32]),
    ((13, -1), [26, 23, 21, 18, 16, 14, 11, 9, 7, 4, 2, 0]),
    ([25] * 8, [25] * 8 + [0] * 4),
    (13, [13] * 12),
    ((13, 0.0), [13] * 12),
    (0, [0] * 12),
])
def test_schedule_forms(r, expected):
    assert parse_schedule(r, 12) == expected


def test_depth_one():
    assert parse_schedule(5, 1) == [5]
    assert parse_schedule((5, -1), 1) == [10]


@pytest.mark.parametrize("bad", [-1, (16, 1.5), (16, -2), [1] * 13, [3, -1], "13", 1.5, (1, 2, 3), True, None])
def test_invalid_schedules_name_accepted_forms(bad):
    with pytest.raises(OptionError, match="accepted"):
        parse_schedule(bad, 12)
