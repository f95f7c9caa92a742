"""`POST /token` (JSON token) and `POST /token/cookie` (HttpOnly cookie) for browsers."""

from __future__ import annotations

from flask import Blueprint, current_app, g, request

from services.tokens import COOKIE_NAME

from .common import engine, json_response

bp = Blueprint("tokens", __name__)


def _issue() -> dict:
    """A token for the caller; one minted with a token never outlives the token it came from."""
    stored = engine().get_document("users", g.user["_id"])  # the fingerprint needs the hash
    return current_app.extensions["changefeed.tokens"].issue(stored, not_after=g.auth_expires)


@bp.post("/token")
def issue_token():
    return json_response(_issue())


@bp.post("/token/cookie")
def issue_cookie():
    token = _issue()
    response = json_response({"token_type": "cookie", "expires_in": token["expires_in"]})
    response.set_cookie(
        COOKIE_NAME,
        token["access_token"],
        max_age=token["expires_in"],
        httponly=True,
        samesite="Strict",
        secure=request.is_secure,
        path="/",
    )
    return response


@bp.delete("/token/cookie")
def clear_cookie():
    response = json_response({}, status=200)
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="Strict")
    return response
