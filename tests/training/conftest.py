"""The training tests' tiny runs start from fresh weights, whatever ``train.init_from`` the demo config names
(the demo's VQA stage starts from the prior alignment's export, which a test run has not made)."""

import pytest


@pytest.fixture
def tiny_overrides(tiny_overrides):
    return [*tiny_overrides, "train.init_from=null"]
