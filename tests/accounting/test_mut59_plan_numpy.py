"""mut59 (stop 55): `make_plan_document` takes numpy's scalars for prv_relative_eps_error as the float they hold
(h154 N3): the document, its JSON and its figures are those of the plain float. The existing test passes numpy
scalars to PrivacyPlan only."""
from __future__ import annotations

import json

import numpy as np
import pytest

import accounting


@pytest.mark.parametrize("scalar", [np.float32, np.float64, np.longdouble])
def test_a_numpy_prv_relative_eps_error_makes_the_document_of_the_float(scalar):
    plan = accounting.PrivacyPlan(dataset_size=1000, batch_size=50, steps=40, noise_multiplier=1.25, delta=1e-5)
    value = float(np.float32(0.0625))   # exact in every width
    plain = accounting.make_plan_document(plan, prv_relative_eps_error=value)
    doc = accounting.make_plan_document(plan, prv_relative_eps_error=scalar(value))
    assert json.loads(doc.to_json()) == json.loads(plain.to_json())
    assert type(doc.prv_eps_error) is float and doc.prv_eps_error == plain.prv_eps_error
