"""The privacy contract (DESIGN.md section 2). Never imports torch.

    plan = PrivacyPlan(dataset_size=4000, batch_size=256, steps=469, noise_multiplier=1.0,
                       delta=1e-5).calibrate(epsilon=10.0)
    write_plan(make_plan_document(plan), "plan.json")
"""
from accounting.accountants import (
    PRV_ERRORS,
    EpsilonReport,
    PldAccountant,
    PrvAccountant,
    RdpAccountant,
    UnsupportedEventError,
    dpsgd_event,
)
from accounting.fft_pld import FftPldAccountant, FftPrecisionError
from accounting.calibrate import (
    MAX_NOISE_MULTIPLIER,
    MAX_STEPS,
    MIN_NOISE_MULTIPLIER,
    calibrate_noise_multiplier,
    compute_epsilon,
    max_steps,
    pld_discretization,
)
from accounting.plan import (
    FORMAT,
    MAX_DATASET_SIZE,
    MIN_DELTA,
    AccountingError,
    NotCalibratedError,
    PlanDocument,
    PlanError,
    PrivacyPlan,
    certified_epsilon,
    epsilon_spent,
    load_plan,
    parse_plan,
    make_plan_document,
    plan_from_dict,
    verify_document,
    write_plan,
)

__all__ = [
    "FORMAT",
    "MAX_DATASET_SIZE",
    "MAX_NOISE_MULTIPLIER",
    "MAX_STEPS",
    "MIN_DELTA",
    "MIN_NOISE_MULTIPLIER",
    "PRV_ERRORS",
    "AccountingError",
    "EpsilonReport",
    "FftPldAccountant",
    "FftPrecisionError",
    "NotCalibratedError",
    "PlanDocument",
    "PlanError",
    "PldAccountant",
    "PrivacyPlan",
    "PrvAccountant",
    "RdpAccountant",
    "UnsupportedEventError",
    "calibrate_noise_multiplier",
    "certified_epsilon",
    "compute_epsilon",
    "dpsgd_event",
    "epsilon_spent",
    "load_plan",
    "parse_plan",
    "make_plan_document",
    "max_steps",
    "plan_from_dict",
    "pld_discretization",
    "verify_document",
    "write_plan",
]
