"""Shared test fixtures."""

import pathlib

import pytest

# Real T5X-written checkpoints, beside the checkout (see their README.md).
T5X_FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "t5x"


@pytest.fixture(scope="session")
def t5x_fixtures() -> pathlib.Path:
    """The folder of real T5X checkpoints; a test needing it fails without it."""
    assert T5X_FIXTURES.is_dir(), (
        f"The T5X test fixtures are missing: expected {T5X_FIXTURES} (the folder "
        "shared/fixtures/t5x beside the repository root). Restore it; tests never skip it.")
    return T5X_FIXTURES
