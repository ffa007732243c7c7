"""WASIConfig: validation naming the field and value, derived flags, dict round trip."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wasi.config import MODES, TARGETS, WASIConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_match_the_paper_setup():
    config = WASIConfig()
    assert config.mode == "factored"
    assert config.target == "mlp"
    assert config.eps == 0.8
    assert config.rank is None and config.activation_rank is None
    assert config.effective_activation_eps == 0.8


@pytest.mark.parametrize("eps", [0, 0.0, -1, 1.5, math.nan, math.inf, "0.5", None, True])
def test_eps_outside_unit_interval_is_rejected(eps):
    with pytest.raises(ValueError, match=r"WASIConfig\.eps must be a number in \(0, 1\]"):
        WASIConfig(eps=eps)


@pytest.mark.parametrize("eps", [1e-6, 0.5, 1, 1.0])
def test_eps_inside_unit_interval_is_accepted(eps):
    assert WASIConfig(eps=eps).eps == eps


@pytest.mark.parametrize("field,value,shown", [
    ("rank", 0, "0"), ("rank", -3, "-3"), ("rank", 2.5, "2.5"), ("rank", True, "True"),
    ("activation_rank", 0, "0"), ("activation_rank", (4, 0, 2), "0"), ("activation_rank", 1.5, "1.5"),
    ("activation_eps", 0.0, "0.0"), ("activation_eps", 1.01, "1.01"), ("activation_eps", math.nan, "nan"),
    ("seed", -1, "-1"), ("seed", 1.0, "1.0"), ("seed", True, "True"),
    ("reorth_every", -1, "-1"), ("reorth_every", 0.5, "0.5"), ("reorth_every", True, "True"),
    ("mode", "dense", "'dense'"), ("target", "conv", "'conv'"),
    ("precondition", 1, "1"), ("grad_check_every", -1, "-1"), ("grad_check_every", 2.0, "2.0"),
    ("track_every", 0, "0"), ("track_every", 2.0, "2.0"),
    ("grad_cosine_floor", 1.0, "1.0"), ("grad_cosine_floor", -0.1, "-0.1"), ("grad_cosine_floor", math.nan, "nan"),
])
def test_invalid_field_raises_naming_field_and_value(field, value, shown):
    with pytest.raises(ValueError, match=rf"WASIConfig\.{field}\b.*got {re.escape(shown)}$"):
        WASIConfig(**{field: value})


@pytest.mark.parametrize("ranks", [(4,), (1, 2, 3, 4, 5)])
def test_activation_rank_tuple_needs_two_to_four_modes(ranks):
    with pytest.raises(ValueError, match="one rank per input mode"):
        WASIConfig(activation_rank=ranks)


def test_activation_rank_list_becomes_tuple_and_config_stays_hashable():
    config = WASIConfig(activation_rank=[4, 8, 16])
    assert config.activation_rank == (4, 8, 16)
    assert hash(config) == hash(WASIConfig(activation_rank=(4, 8, 16)))


def test_activation_rank_and_eps_are_exclusive():
    with pytest.raises(ValueError, match="exclusive"):
        WASIConfig(activation_rank=4, activation_eps=0.5)


def test_effective_activation_eps():
    assert WASIConfig(eps=0.7).effective_activation_eps == 0.7
    assert WASIConfig(eps=0.7, activation_eps=0.4).effective_activation_eps == 0.4
    assert WASIConfig(eps=0.7, activation_rank=3).effective_activation_eps is None


@pytest.mark.parametrize("mode,compress,factor", [
    ("factored", True, True),
    ("reference", True, True),
    ("activations-only", True, False),
    ("weights-only", False, True),
])
def test_mode_flags(mode, compress, factor):
    config = WASIConfig(mode=mode)
    assert (config.compress_activations, config.factor_weights) == (compress, factor)


def test_known_modes_and_targets_are_all_accepted():
    for mode in MODES:
        WASIConfig(mode=mode)
    for target in TARGETS:
        WASIConfig(target=target)


def test_config_is_frozen():
    config = WASIConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.eps = 0.5  # type: ignore[misc]


def test_dict_round_trip_and_unknown_keys():
    config = WASIConfig(eps=0.6, rank=None, activation_rank=(2, 3, 4), mode="reference", target="all-linear",
                        seed=7, reorth_every=3)
    data = config.to_dict()
    assert data["activation_rank"] == [2, 3, 4]  # JSON-friendly
    back, unknown = WASIConfig.from_dict(data)
    assert back == config and unknown == []
    back, unknown = WASIConfig.from_dict({**data, "future_knob": 1, "another": "x"})
    assert back == config and unknown == ["another", "future_knob"]


def test_from_dict_still_validates():
    with pytest.raises(ValueError, match="WASIConfig.eps"):
        WASIConfig.from_dict({"eps": 2.0})


def test_a_version_1_config_keeps_the_behaviour_it_was_trained_with():
    old = {"eps": 0.8, "rank": None, "activation_rank": None, "activation_eps": None, "mode": "factored",
           "target": "mlp", "seed": 0, "reorth_every": 1, "recompute_from_code": False}  # as version 1 wrote it
    config, unknown = WASIConfig.from_dict(old, version=1)
    assert unknown == []
    assert config.precondition is False and config.grad_cosine_floor == 0.0 and not config.scaled_step
    today, _ = WASIConfig.from_dict(old)  # the current version: today's defaults
    assert today.precondition is True and today.grad_cosine_floor == WASIConfig().grad_cosine_floor > 0
    explicit, _ = WASIConfig.from_dict({**old, "precondition": True}, version=1)
    assert explicit.precondition is True  # a value that is there wins


def test_scaled_step_only_in_modes_with_factor_parameters():
    assert WASIConfig().scaled_step and WASIConfig(mode="weights-only").scaled_step
    assert not WASIConfig(mode="reference").scaled_step
    assert not WASIConfig(mode="activations-only").scaled_step
    assert not WASIConfig(precondition=False).scaled_step


def test_a_config_saved_with_recompute_from_code_loads_into_fuse_activation():
    config, unknown = WASIConfig.from_dict({"eps": 0.8, "recompute_from_code": True}, version=1)
    assert unknown == [] and config.fuse_activation is True
    assert "recompute_from_code" not in config.to_dict() and config.to_dict()["fuse_activation"] is True
    both, _ = WASIConfig.from_dict({"recompute_from_code": False, "fuse_activation": True})
    assert both.fuse_activation is True  # the new key wins


def test_the_old_keyword_recompute_from_code_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'recompute_from_code' is deprecated.*'fuse_activation'"):
        config = WASIConfig(recompute_from_code=True)
    assert config == WASIConfig(fuse_activation=True)
    assert dataclasses.replace(config, eps=0.5).fuse_activation is True  # replace keeps it, without a warning
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="former name of fuse_activation"):
        WASIConfig(fuse_activation=True, recompute_from_code=False)


# no example database: the same examples on every run, and nothing written into the repository
FAST = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


_NOT_A_FRACTION = st.one_of(
    st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
    st.just(float("nan")), st.just(float("inf")), st.just(-float("inf")),
    st.booleans(), st.text(max_size=3), st.none(),
)


@FAST
@given(value=_NOT_A_FRACTION, field=st.sampled_from(["eps", "activation_eps"]))
def test_energy_thresholds_outside_zero_one_are_refused_naming_the_field(value, field):
    if field == "eps" and value is None:
        value = float("nan")
    if field == "activation_eps" and value is None:
        return  # None means "not set" for activation_eps
    with pytest.raises(ValueError, match=rf"^WASIConfig\.{field} must be a number in \(0, 1\], got "):
        WASIConfig(**{field: value})


@FAST
@given(value=st.floats(min_value=0.0, max_value=1.0, exclude_min=True))
def test_every_threshold_in_zero_one_is_accepted(value):
    assert WASIConfig(eps=value, activation_eps=value).eps == value


@pytest.mark.parametrize("field,value,message", [
    ("target", "mlps", r"WASIConfig\.target must be one of \('mlp', 'attention', 'all-linear'\), got 'mlps'"),
    ("mode", "fast", r"WASIConfig\.mode must be one of"),
    ("rank", 0, r"WASIConfig\.rank must be a positive integer, got 0"),
    ("activation_rank", (2, 0, 3), r"WASIConfig\.activation_rank must be a positive integer, got 0"),
    ("activation_rank", (2,), r"needs one rank per input mode"),
])
def test_other_bad_config_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        WASIConfig(**{field: value})
