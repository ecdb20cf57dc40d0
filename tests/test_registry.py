"""megatron_lcr.registry.lookup: the one "unknown X; valid: ..." error of every registry."""

import pytest

from megatron_lcr.registry import lookup


def test_lookup_returns_the_entry_or_names_the_bad_name_and_the_valid_ones():
    registry = {"ppo": 1, "gspo": 2}
    assert lookup(registry, "gspo", "policy loss") == 2
    with pytest.raises(ValueError) as err:
        lookup(registry, "token", "policy loss")
    assert str(err.value) == "unknown policy loss 'token'; valid: 'ppo', 'gspo'"
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no KeyError traceback
    with pytest.raises(ValueError, match="unknown policy loss None; valid: 'ppo', 'gspo'"):
        lookup(registry, None, "policy loss")
