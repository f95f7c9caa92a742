"""Every domain error is a services.errors.ChangefeedError that carries its HTTP status."""

import pytest

from services import acl, errors, pipeline, tokens, updates


@pytest.mark.parametrize(
    "cls,status",
    [
        (pipeline.PipelineError, 400),
        (pipeline.VariableError, 400),
        (pipeline.AvarsError, 400),
        (updates.UpdateError, 400),
        (acl.PredicateError, 400),
        (acl.AclError, 400),
        (tokens.TokenError, 401),
    ],
)
def test_request_errors_are_changefeed_errors_with_their_status(cls, status):
    exc = cls("the fault")
    assert isinstance(exc, errors.ChangefeedError) and not isinstance(exc, ValueError)
    assert exc.status == status and exc.message == str(exc) == "the fault"


def test_event_errors_are_changefeed_errors_reported_in_band():
    assert issubclass(pipeline.EventError, errors.ChangefeedError)
    assert not issubclass(pipeline.EventError, errors.BadRequest)  # never an HTTP answer of its own
