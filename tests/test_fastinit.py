"""field_filler: frozen dataclasses built from field values, equal to what __init__ builds."""

from __future__ import annotations

import copy
import pickle
import weakref
from dataclasses import FrozenInstanceError, asdict, dataclass, fields

import pytest

from sage_llm.bench.stats import RequestMeasurement
from sage_llm.control_plane.snapshot import (
    InstanceView,
    RequestInfo,
    fill_request_info,
    fill_view,
)
from sage_llm.engines.base import (
    Chunk,
    EngineRequest,
    Usage,
    fill_chunk,
    fill_engine_request,
    fill_usage,
)
from sage_llm.fastinit import field_filler
from sage_llm.types import RequestPriority, RequestResult, RequestStatus, fill_request_result
from tests.factories import make_instance_view, make_request_info


@dataclass(frozen=True)
class _Plain:
    a: int
    b: str


def test_field_filler_builds_what_the_constructor_builds() -> None:
    make = field_filler(RequestMeasurement, [f.name for f in fields(RequestMeasurement)][::-1])
    values = asdict(
        RequestMeasurement("r", RequestPriority.HIGH, "u", 1.0, 1.5, (), 2.0, 10, 4, slo_e2e_s=3.0)
    )
    built = make(*[values[f.name] for f in fields(RequestMeasurement)][::-1])
    assert built == RequestMeasurement(**values) and asdict(built) == values
    plain = field_filler(_Plain, ["b", "a"])("x", 1)  # no slots: filled through its dict
    assert plain == _Plain(1, "x") and vars(plain) == {"a": 1, "b": "x"}
    info = make_request_info(request_id="x", block_hashes=(1, 2), tags={"a": 1})
    names = [f.name for f in fields(RequestInfo)]
    assert field_filler(RequestInfo, names)(*[getattr(info, n) for n in names]) == info
    with pytest.raises(ValueError, match="fields"):
        field_filler(RequestInfo, names[1:])


def test_the_shared_fillers_take_every_field_in_declaration_order() -> None:
    info = make_request_info("y", slo_s=4.0, excluded_instances=frozenset({"a"}))
    assert fill_request_info(*[getattr(info, f.name) for f in fields(RequestInfo)]) == info
    view = make_instance_view("v", in_flight=3, nvlink_peers=frozenset({"w"}))
    assert fill_view(*[getattr(view, f.name) for f in fields(InstanceView)]) == view
    req = EngineRequest("r", "m", prompt="hi", stop=("x",), extra={"n": 2}, priority=1)
    assert fill_engine_request(*[getattr(req, f.name) for f in fields(EngineRequest)]) == req
    result = RequestResult(
        "r", RequestStatus.FAILED, "t", "stop", 3, 2, 1, "i", "p", 0.5, 1.0, 2.0, 9.0,
        False, "boom", 2, [7], [{"x": 1}], 0.25,
    )  # fmt: skip
    assert fill_request_result(*[getattr(result, f.name) for f in fields(RequestResult)]) == result
    usage = Usage(5, 4, 3)
    assert fill_usage(5, 4, 3, None) == usage
    assert fill_usage(5, 4, 3, {"x": 1}) == Usage(5, 4, 3, {"x": 1})
    chunk = Chunk(" a", (1, 2), "length", usage, {"lp": 1}, 2)
    assert fill_chunk(*[getattr(chunk, f.name) for f in fields(Chunk)]) == chunk
    assert chunk.with_usage(Usage()) == Chunk(" a", (1, 2), "length", Usage(), {"lp": 1}, 2)


@dataclass(frozen=True, slots=True)
class _Base:
    a: int


@dataclass(frozen=True, slots=True)
class _Derived(_Base):
    b: str


def test_slotted_classes_are_filled_on_a_twin_and_become_the_real_class() -> None:
    make = field_filler(InstanceView, [f.name for f in fields(InstanceView)])
    assert make.__globals__["_twin"].__slots__ == InstanceView.__slots__
    view = make_instance_view("v", in_flight=3, nvlink_peers=frozenset({"w"}))
    built = make(*[getattr(view, f.name) for f in fields(InstanceView)])
    assert type(built) is InstanceView and built == view and hash(built) == hash(view)
    assert copy.copy(built) == view and pickle.loads(pickle.dumps(built)) == view
    with pytest.raises(FrozenInstanceError):
        built.in_flight = 4  # type: ignore[misc]
    assert built.free_slots == view.free_slots  # the class's methods, not the twin's


def test_a_slotted_class_with_a_base_is_filled_through_its_setters() -> None:
    make = field_filler(_Derived, ["b", "a"])
    assert "_twin" not in make.__globals__
    built = make("x", 1)
    assert type(built) is _Derived and built == _Derived(1, "x")


@dataclass(frozen=True, slots=True, weakref_slot=True)
class _Weak:
    a: int
    b: str


def test_a_class_refusing_class_assignment_falls_back_to_its_setters() -> None:
    make = field_filler(_Weak, ["b", "a"])  # Python refuses a twin with a __weakref__ slot
    assert "_twin" not in make.__globals__
    built = make("x", 1)
    assert type(built) is _Weak and built == _Weak(1, "x") and hash(built) == hash(_Weak(1, "x"))
    assert weakref.ref(built)() is built and pickle.loads(pickle.dumps(built)) == built
    with pytest.raises(FrozenInstanceError):
        built.a = 2  # type: ignore[misc]


def test_names_must_be_each_field_once() -> None:
    with pytest.raises(ValueError, match="fields"):
        field_filler(_Plain, ["a", "a", "b"])
    with pytest.raises(ValueError, match="fields"):
        field_filler(_Plain, ["a", "b", "c"])
